"""Scorers that compute (torch, transformers): CLIP score, as torchmetrics defines it: 100 × the cosine
of the image's and the prompt's CLIP embeddings, clipped at 0; a video's is the mean over frames
sampled evenly. transformers' own CLIPModel, tokenizer and image processor do the work."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import torch

from stagediff.scoring import VIDEO_FRAMES, Scorer


class ClipScorer:
    """A loaded CLIP model with its tokenizer and image processor."""

    def __init__(self, scorer: Scorer):
        from transformers import AutoTokenizer, CLIPModel

        self.scorer = scorer
        self.model = CLIPModel.from_pretrained(scorer.folder, dtype=torch.float32, use_safetensors=True).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(scorer.folder)
        self.images = clip_image_processor().from_pretrained(scorer.folder)

    @property
    def components(self) -> dict:
        """What it holds, as a pipeline's components are named (`stages.loaded_components`)."""
        return {"model": self.model, "tokenizer": self.tokenizer, "image_processor": self.images}

    @torch.no_grad()
    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """Unit-length prompt embeddings `[P, D]` (prompts longer than the model reads are truncated)."""
        tokens = self.tokenizer(list(prompts), padding=True, truncation=True,
                                max_length=self.model.config.text_config.max_position_embeddings, return_tensors="pt")
        features = self.model.text_projection(self.model.text_model(**tokens).pooler_output)
        return torch.nn.functional.normalize(features, dim=-1)

    @torch.no_grad()
    def image_embeddings(self, frames: Sequence[np.ndarray]) -> torch.Tensor:
        """Unit-length image embeddings `[N, D]` of uint8 `[H, W, 3]` frames."""
        pixels = self.images(images=list(frames), return_tensors="pt")["pixel_values"]
        features = self.model.visual_projection(self.model.vision_model(pixel_values=pixels).pooler_output)
        return torch.nn.functional.normalize(features, dim=-1)

    def scores(self, media: Sequence[Sequence[np.ndarray]], prompts: Sequence[str]) -> list[float]:
        """The CLIP score of each media (its frames: one for an image) against its prompt, in one batch."""
        distinct = list(dict.fromkeys(prompts))
        texts = self.text_embeddings(distinct)
        images = self.image_embeddings([frame for frames in media for frame in frames])
        results, first = [], 0
        for frames, prompt in zip(media, prompts):
            text = texts[distinct.index(prompt)]
            per_frame = (100 * images[first: first + len(frames)] @ text).clamp(min=0)
            results.append(float(per_frame.mean()))
            first += len(frames)
        return results


def clip_image_processor():
    """CLIP's image processor class: without torchvision, transformers 5 serves the PIL one (named, so it
    prints no fallback note)."""
    try:
        from transformers import CLIPImageProcessorPil

        return CLIPImageProcessorPil
    except ImportError:
        from transformers import CLIPImageProcessor

        return CLIPImageProcessor


LOADERS = {"clip": ClipScorer}


def load_scorer(scorer: Scorer):
    return LOADERS[scorer.metric](scorer)


def media_frames(data: bytes, extension: str, frames: int = VIDEO_FRAMES) -> list[np.ndarray]:
    """The frames a score reads: a PNG's image; `frames` of a video sampled evenly (first and last)."""
    if extension == "png":
        from PIL import Image

        with Image.open(io.BytesIO(data)) as image:
            return [np.asarray(image.convert("RGB"))]
    import imageio.v2 as imageio

    from stagediff.media import _mp4_file

    with _mp4_file(data) as path:
        reader = imageio.get_reader(path, format="FFMPEG")
        try:
            every = [frame for frame in reader]
        finally:
            reader.close()
    indices = sorted(set(np.linspace(0, len(every) - 1, num=min(frames, len(every))).round().astype(int).tolist()))
    return [every[index] for index in indices]

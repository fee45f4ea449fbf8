"""Media files: PNG with generation metadata in text chunks, MP4 (H.264) for videos."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import tempfile
from collections.abc import Iterable, Iterator, Mapping

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

METADATA_CHUNK = "stagediff"


def png_bytes(frame: np.ndarray, metadata: Mapping) -> bytes:
    """Encode one uint8 `[H, W, 3]` frame as PNG; each metadata entry becomes a text chunk,
    and the whole mapping a JSON chunk named `stagediff`."""
    info = PngInfo()
    for name, value in metadata.items():
        info.add_text(name, value if isinstance(value, str) else json.dumps(value))
    info.add_text(METADATA_CHUNK, json.dumps(metadata, sort_keys=True))
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def read_png_metadata(data: bytes) -> dict:
    """The generation metadata stored by `png_bytes`."""
    with Image.open(io.BytesIO(data)) as image:
        return json.loads(image.text[METADATA_CHUNK])


def mp4_bytes(frame_chunks: Iterable[np.ndarray], fps: int, metadata: Mapping) -> bytes:
    """Encode uint8 frame chunks `[f, H, W, 3]` to H.264 MP4 as they arrive (no full-video copy in
    memory); the metadata goes into the container's comment tag as JSON."""
    import imageio.v2 as imageio

    handle, path = tempfile.mkstemp(suffix=".mp4")
    os.close(handle)
    try:
        writer = imageio.get_writer(
            path,
            fps=fps,
            codec="libx264",
            quality=None,
            pixelformat="yuv420p",
            macro_block_size=1,
            ffmpeg_log_level="error",
            output_params=["-crf", "12", "-metadata", f"comment={json.dumps(metadata, sort_keys=True)}"],
        )
        with writer:
            for chunk in frame_chunks:
                for frame in chunk:
                    writer.append_data(frame)
        with open(path, "rb") as file:
            return file.read()
    finally:
        os.remove(path)


@contextlib.contextmanager
def _mp4_file(data: bytes) -> Iterator[str]:
    """The bytes in a temporary file, for ffmpeg to read."""
    with tempfile.NamedTemporaryFile(suffix=".mp4") as file:
        file.write(data)
        file.flush()
        yield file.name


def read_mp4_metadata(data: bytes) -> dict:
    """The generation metadata stored by `mp4_bytes` (read back with the bundled ffmpeg)."""
    with _mp4_file(data) as path:
        return _mp4_metadata(path)


def _mp4_metadata(path: str) -> dict:
    import imageio_ffmpeg

    listing = subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", path, "-f", "ffmetadata", "-"],
        capture_output=True, text=True, check=True,
    ).stdout
    # ffmetadata escapes '=', ';', '#', '\\' and newlines with a backslash.
    for line in re.split(r"(?<!\\)\n", listing):
        if line.startswith("comment="):
            return json.loads(re.sub(r"\\(.)", r"\1", line[len("comment=") :], flags=re.S))
    raise ValueError("no stagediff metadata in this MP4")


def middle_frame(data: bytes) -> np.ndarray:
    """The middle frame of an MP4, uint8 `[H, W, 3]`."""
    import imageio.v2 as imageio
    import imageio_ffmpeg

    with _mp4_file(data) as path:
        frames, _seconds = imageio_ffmpeg.count_frames_and_secs(path)
        reader = imageio.get_reader(path, format="FFMPEG")
        try:
            return reader.get_data(frames // 2)
        finally:
            reader.close()


def media_bytes(extension: str, frame_chunks: Iterable[np.ndarray], fps: int | None, metadata: Mapping) -> bytes:
    """Encode decoded frames in the family's media format."""
    if extension == "png":
        (frame,) = [frame for chunk in frame_chunks for frame in chunk]
        return png_bytes(frame, metadata)
    if extension == "mp4":
        return mp4_bytes(frame_chunks, fps or 16, metadata)
    raise ValueError(f"unknown media format {extension!r}")


class CorruptMedia(ValueError):
    """A media file that does not decode completely, or lacks its stagediff metadata."""


def verified_media_metadata(extension: str, data: bytes) -> dict:
    """The generation metadata of a media file, after decoding all of it: every pixel of a PNG; every
    frame of an MP4, which must be as many as its metadata says. Raises CorruptMedia otherwise."""
    try:
        if extension == "png":
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                return json.loads(image.text[METADATA_CHUNK])
        if extension == "mp4":
            import imageio_ffmpeg

            with _mp4_file(data) as path:
                metadata = _mp4_metadata(path)
                frames, _seconds = imageio_ffmpeg.count_frames_and_secs(path)
            if frames != metadata.get("frames"):
                raise CorruptMedia(f"{frames} frames decode, its metadata says {metadata.get('frames')}")
            return metadata
    except CorruptMedia:
        raise
    except (OSError, ValueError, KeyError, SyntaxError, RuntimeError, subprocess.CalledProcessError) as error:
        raise CorruptMedia(str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__) from None
    raise ValueError(f"unknown media format {extension!r}")


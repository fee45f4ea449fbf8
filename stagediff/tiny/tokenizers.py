"""Offline tokenizers for tiny models: small vocabularies built in code, no hub access."""

from __future__ import annotations

import string
from pathlib import Path

CLIP_SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


def byte_level_alphabet() -> list[str]:
    """The 256 printable stand-ins that byte-level BPE tokenizers use for raw bytes (GPT-2's table)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return [table[byte] for byte in range(256)]


def clip_vocab() -> dict[str, int]:
    """A byte-level CLIP vocabulary: every byte alone and as a word end, plus the special tokens."""
    chars = byte_level_alphabet()
    tokens = chars + [c + "</w>" for c in chars] + list(CLIP_SPECIAL_TOKENS)
    return {token: index for index, token in enumerate(tokens)}


def clip_config_ids() -> dict:
    """The vocabulary size and special token ids of a CLIP text config that reads the offline CLIP
    tokenizer's ids."""
    vocab = clip_vocab()
    return {"vocab_size": len(vocab), "bos_token_id": vocab[CLIP_SPECIAL_TOKENS[0]],
            "eos_token_id": vocab[CLIP_SPECIAL_TOKENS[1]], "pad_token_id": vocab[CLIP_SPECIAL_TOKENS[1]]}


def save_clip_tokenizer(folder: Path, pad_token: str = "<|endoftext|>", model_max_length: int = 77):
    """Save a working CLIPTokenizer with a byte-level vocabulary to `folder` and return it."""
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer(vocab=clip_vocab(), merges=[], pad_token=pad_token)
    tokenizer.model_max_length = model_max_length
    tokenizer.save_pretrained(folder)
    return tokenizer



T5_SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")
T5_CHARACTERS = string.ascii_letters + string.digits + string.punctuation


def save_t5_tokenizer(folder: Path):
    """Save a working T5 (Unigram) tokenizer over ASCII characters to `folder` and return it."""
    from transformers import T5TokenizerFast

    # Word-initial pieces ("▁a") score above bare characters so words start the way T5's do.
    pieces = [(token, 0.0) for token in T5_SPECIAL_TOKENS] + [("▁", -3.0)]
    pieces += [("▁" + char, -1.0) for char in T5_CHARACTERS] + [(char, -2.0) for char in T5_CHARACTERS]
    tokenizer = T5TokenizerFast(vocab=pieces, extra_ids=0)
    tokenizer.save_pretrained(folder)
    return tokenizer


def t5_config_ids(tokenizer) -> dict:
    """The vocabulary size and special token ids of a T5/UMT5 config that reads `tokenizer`'s ids."""
    return {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id, "decoder_start_token_id": tokenizer.pad_token_id}


MISTRAL_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]")
# Mistral-Small-3 style: system prompt and user turns in brackets; content is a string or a list of text blocks.
MISTRAL_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['content'] is string %}{%- set text = message['content'] %}"
    "{%- else %}{%- set text = message['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join('') %}{%- endif %}"
    "{%- if message['role'] == 'system' %}{{- '[SYSTEM_PROMPT]' + text + '[/SYSTEM_PROMPT]' }}"
    "{%- elif message['role'] == 'user' %}{{- '[INST]' + text + '[/INST]' }}"
    "{%- else %}{{- text + eos_token }}{%- endif %}"
    "{%- endfor %}"
)


def save_mistral_tokenizer(folder: Path):
    """Save a plain byte-level BPE tokenizer with a Mistral chat template to `folder` and return it.

    FLUX.2-dev ships a PixtralProcessor here; the pipeline only calls `apply_chat_template`, which a
    tokenizer serves without the image processor (and so without torchvision)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = byte_level_vocab(MISTRAL_SPECIAL_TOKENS)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=list(MISTRAL_SPECIAL_TOKENS[4:]),
    )
    tokenizer.chat_template = MISTRAL_CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return tokenizer


QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Qwen3 style, including the empty thinking block that `enable_thinking=False` adds.
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


def save_qwen_tokenizer(folder: Path):
    """Save a Qwen2 byte-level BPE tokenizer with a Qwen3 chat template to `folder` and return it."""
    from transformers import Qwen2TokenizerFast

    tokenizer = Qwen2TokenizerFast(
        vocab=byte_level_vocab(QWEN_SPECIAL_TOKENS), merges=[], additional_special_tokens=list(QWEN_SPECIAL_TOKENS[1:])
    )
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return tokenizer


def byte_level_vocab(special_tokens: tuple[str, ...]) -> dict[str, int]:
    """Special tokens first, then one token per byte (no merges: every byte is its own token)."""
    tokens = list(special_tokens) + byte_level_alphabet()
    return {token: index for index, token in enumerate(tokens)}

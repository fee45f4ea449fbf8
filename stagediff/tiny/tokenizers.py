"""Offline tokenizers for tiny models: small vocabularies built in code, no hub access."""

from __future__ import annotations

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


def save_clip_tokenizer(folder: Path, pad_token: str = "<|endoftext|>", model_max_length: int = 77):
    """Save a working CLIPTokenizer with a byte-level vocabulary to `folder` and return it."""
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer(vocab=clip_vocab(), merges=[], pad_token=pad_token)
    tokenizer.model_max_length = model_max_length
    tokenizer.save_pretrained(folder)
    return tokenizer


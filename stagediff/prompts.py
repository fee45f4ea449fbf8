"""Prompts and seeds beyond single flags: prompt files (local or gs://; text with one prompt a line, or
JSONL whose lines are `{"prompt": ..., "negative_prompt": ...}`) and seed ranges (`0-999`, inclusive)."""

from __future__ import annotations

import json
import re

from stagediff.confinement import check_location
from stagediff.errors import StagediffError, one_line

MAX_SEEDS = 1_000_000
SEED_RANGE = re.compile(r"(\d+)-(\d+)")


def read_prompt_file(uri: str) -> list[str | dict]:
    """The prompts of a file: one per non-empty line, or (`.jsonl`) one JSON object per line."""
    check_location("--prompt-file", uri)
    try:
        text = _read_text(uri)
    except FileNotFoundError:
        raise StagediffError(f"--prompt-file {uri}: no such file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise StagediffError(f"--prompt-file {uri}: cannot read it ({one_line(error)})") from None
    lines = [(number, line.strip()) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise StagediffError(f"--prompt-file {uri} holds no prompt")
    if not uri.endswith(".jsonl"):
        return [line for _, line in lines]
    return [_jsonl_prompt(uri, number, line) for number, line in lines]


def _jsonl_prompt(uri: str, number: int, line: str) -> str | dict:
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as error:
        raise StagediffError(f"--prompt-file {uri} line {number}: not JSON ({error.msg})") from None
    if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str) or set(entry) - {"prompt", "negative_prompt"}:
        raise StagediffError(f"--prompt-file {uri} line {number}: expected {{\"prompt\": ..., \"negative_prompt\": ...}}, "
                             f"got {line[:80]!r}")
    return entry


def _read_text(uri: str) -> str:
    from stagediff.gcs import read_location

    return read_location(uri).decode("utf-8")


def expand_seeds(values) -> list[int]:
    """Seeds from integers, their strings and inclusive ranges (`"0-999"`), in order; a one-line error
    naming any other value. Negative or oversized integers are left to the request's validation."""
    seeds: list[int] = []
    for value in values:
        if isinstance(value, int) and not isinstance(value, bool):
            seeds.append(value)
            continue
        text = str(value).strip()
        match = SEED_RANGE.fullmatch(text)
        if match:
            first, last = int(match[1]), int(match[2])
            if first > last or last - first >= MAX_SEEDS:
                raise StagediffError(f"--seeds {text!r}: a range is FIRST-LAST with FIRST <= LAST, at most {MAX_SEEDS} seeds")
            seeds.extend(range(first, last + 1))
        else:
            try:
                seeds.append(int(text))
            except ValueError:
                raise StagediffError(f"--seed {value!r} is not an integer or a range FIRST-LAST") from None
        if len(seeds) > MAX_SEEDS:
            raise StagediffError(f"--seeds: more than {MAX_SEEDS} seeds")
    return seeds

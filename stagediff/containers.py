"""PNG and MP4 files read by their structure alone: chunk and box headers, the PNG's text chunks, the
MP4's movie box. Enough to tell a complete file from a truncated one and to read stagediff's metadata
(with the MP4's frame count) without touching a pixel, reading a few hundred bytes of a file that may be
megabytes long."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator

Read = Callable[[int, int], bytes]
"""`read(offset, length)`: bytes of the file."""

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
METADATA_KEYWORD = b"stagediff"
"""The PNG text chunk (and MP4 comment) holding the generation metadata as JSON."""
LATENTS_CHECKSUM = "latents_checksum"
"""Media metadata: the checksum of the latents a media file was decoded from."""


class IncompleteFile(ValueError):
    """A file whose structure ends early or does not hold stagediff's metadata."""


def file_reader(file) -> Read:
    """The `Read` of an open binary file."""

    def read(offset: int, length: int) -> bytes:
        file.seek(offset)
        return file.read(length)

    return read


def png_metadata(read: Read, size: int) -> dict:
    """The metadata of a PNG whose chunks tile the file up to its IEND chunk."""
    if read(0, 8) != PNG_SIGNATURE:
        raise IncompleteFile("not a PNG file")
    position, metadata = 8, None
    while position + 12 <= size:
        length, kind = struct.unpack(">I4s", read(position, 8))
        end = position + 12 + length
        if end > size:
            raise IncompleteFile(f"a {kind.decode('latin-1')} chunk runs past the end of the file")
        if kind == b"tEXt":
            keyword, _, text = read(position + 8, length).partition(b"\0")
            if keyword == METADATA_KEYWORD:
                metadata = json.loads(text.decode("latin-1"))
        elif kind == b"IEND":
            if end != size:
                raise IncompleteFile("bytes after the IEND chunk")
            if metadata is None:
                raise IncompleteFile("no stagediff metadata")
            return metadata
        position = end
    raise IncompleteFile("truncated before the IEND chunk")


def mp4_metadata(read: Read, size: int) -> dict:
    """The metadata (from the comment tag) of an MP4 whose top-level boxes tile the file, with a `frames`
    equal to the sample count of its video track."""
    top = {kind: (start, end) for kind, start, _, end in _boxes(read, 0, size)}
    if b"moov" not in top or b"mdat" not in top:
        raise IncompleteFile("no movie box or no media data")
    start, end = top[b"moov"]
    movie = read(start, end - start)
    comment = _find(movie, [b"moov", b"udta", b"meta", b"ilst", b"\xa9cmt", b"data"])
    if comment is None:
        raise IncompleteFile("no stagediff metadata")
    metadata = json.loads(comment[8:].decode())  # after the data box's type and locale fields
    frames = _video_sample_count(movie)
    if frames != metadata.get("frames"):
        raise IncompleteFile(f"{frames} frames in the file, its metadata says {metadata.get('frames')}")
    return metadata


def _boxes(read: Read, start: int, end: int) -> Iterator[tuple[bytes, int, int, int]]:
    """(kind, box start, payload start, box end) of the boxes tiling [start, end)."""
    position = start
    while position < end:
        if position + 8 > end:
            raise IncompleteFile("a box header runs past the end")
        length, kind = struct.unpack(">I4s", read(position, 8))
        header = 8
        if length == 1:
            (length,) = struct.unpack(">Q", read(position + 8, 8))
            header = 16
        elif length == 0:
            length = end - position
        if length < header or position + length > end:
            raise IncompleteFile(f"the {kind.decode('latin-1')} box runs past the end of the file")
        yield kind, position, position + header, position + length
        position += length


def _children(data: bytes, kind: bytes, payload: int, end: int) -> Iterator[tuple[bytes, int, int, int]]:
    if kind == b"meta":
        payload += 4  # a full box: version and flags before its children
    return _boxes(lambda offset, length: data[offset : offset + length], payload, end)


def _find(data: bytes, path: list[bytes]) -> bytes | None:
    """The payload of the box at `path` (kinds from the top) within `data`, which holds the first box."""
    boxes = _boxes(lambda offset, length: data[offset : offset + length], 0, len(data))
    for depth, wanted in enumerate(path):
        for kind, _, payload, end in boxes:
            if kind == wanted:
                if depth == len(path) - 1:
                    return data[payload:end]
                boxes = _children(data, kind, payload, end)
                break
        else:
            return None
    return None


def _video_sample_count(movie: bytes) -> int:
    """The sample count (`stsz`) of the movie's video track (`hdlr` of type `vide`)."""
    (_, _, movie_payload, movie_end), = _boxes(lambda offset, length: movie[offset : offset + length], 0, len(movie))
    for kind, start, _, end in _children(movie, b"moov", movie_payload, movie_end):
        if kind != b"trak":
            continue
        track = movie[start:end]
        handler = _find(track, [b"trak", b"mdia", b"hdlr"])
        if handler is not None and handler[8:12] == b"vide":
            sizes = _find(track, [b"trak", b"mdia", b"minf", b"stbl", b"stsz"])
            if sizes is not None:
                return struct.unpack(">I", sizes[8:12])[0]
    raise IncompleteFile("no video track")

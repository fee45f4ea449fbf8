"""Contact sheets: a run's images as one labelled PNG, or several runs side by side (base model vs LoRA,
last night vs tonight). Rows are prompts; each run's columns are its seeds and swept values (settings or
LoRA scales that differ between its items), labelled; a video shows its middle frame; a scored run shows
each item's scores under its tile. Drawn with Pillow and its default font."""

from __future__ import annotations

import io
import json
import textwrap
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from stagediff.containers import METADATA_KEYWORD
from stagediff.errors import CorruptArtifact
from stagediff.loras import lora_name
from stagediff.manifest import RunManifest, artifact_path
from stagediff.media import middle_frame
from stagediff.store import Store, content_key

SHEET_NAME = "contact-sheet.png"
SHEET_KEY = "contact-sheet-key"
"""Metadata of a written sheet (PNG chunk; object summary): the content key of what it shows."""
SHEET_VERSION = 1
"""Part of that key: a new drawing gives every sheet a new key."""
CELL_PIXELS = 192
"""Images are scaled down to fit a square of this size."""
MAX_ROWS = 24
MAX_COLUMNS = 24
"""A sheet shows at most this many prompts and columns (the first ones); its title says how many it left out."""
PROMPT_WIDTH = 220
PROMPT_CHARACTERS = 30
"""Characters per line of a row's prompt, about what the default font fits in PROMPT_WIDTH."""
PAD = 6
FONT_SIZE = 13
LINE_HEIGHT = FONT_SIZE + 4
SIZE_PROBES = 8
"""The cells take the size of the first image that decodes among this many."""
READERS = 8
"""Media files read at once (an object store answers each read in tens of milliseconds)."""
BACKGROUND, INK, MISSING = (255, 255, 255), (20, 20, 20), (225, 225, 225)


@dataclass(frozen=True)
class Column:
    run: int
    """Index of the run it belongs to."""
    key: tuple
    """(swept values, seed): what its items share."""
    label: tuple[str, ...]


@dataclass(frozen=True)
class Layout:
    """Where everything goes on a sheet."""

    rows: tuple[tuple[str, str | None], ...]
    """(prompt, negative prompt) of each row."""
    columns: tuple[Column, ...]
    cells: dict[tuple[int, int], str]
    """(row, column) → media URI; cells without one stay blank."""
    cell_size: tuple[int, int]
    header_lines: int
    """The title, the run names (several runs), the longest column label."""
    left_out: tuple[int, int]
    """Rows and columns the sheet has no room for."""
    cell_scores: dict[tuple[int, int], str] = field(default_factory=dict)
    """(row, column) → the item's scores as a line under its tile (scored runs)."""

    @property
    def score_lines(self) -> int:
        return 1 if self.cell_scores else 0

    def column_x(self, column: int) -> int:
        run = self.columns[column].run
        return PROMPT_WIDTH + column * (self.cell_size[0] + PAD) + run * 2 * PAD + PAD

    def row_y(self, row: int) -> int:
        return self.header_lines * LINE_HEIGHT + 2 * PAD + row * (self.cell_size[1] + PAD + self.score_lines * LINE_HEIGHT)

    def cell_box(self, row: int, column: int) -> tuple[int, int, int, int]:
        x, y = self.column_x(column), self.row_y(row)
        return x, y, x + self.cell_size[0], y + self.cell_size[1]

    @property
    def size(self) -> tuple[int, int]:
        width = self.column_x(len(self.columns) - 1) + self.cell_size[0] + PAD if self.columns else PROMPT_WIDTH
        return width, self.row_y(len(self.rows))


def sheet_layout(runs: Sequence[RunManifest], image_size: tuple[int, int]) -> Layout:
    """The rows (every run's prompts, in order), the columns (each run's distinct seeds and swept values)
    and the media of each cell; images of `image_size` (width, height) scaled to fit the cells."""
    rows: dict[tuple[str, str | None], int] = {}
    columns: dict[tuple, Column] = {}
    cells: dict[tuple[tuple, tuple], str] = {}
    scores: dict[tuple[tuple, tuple], str] = {}
    all_rows, all_columns = set(), set()
    for index, run in enumerate(runs):
        items = run.manifest["items"]
        values = [_swept_values(item) for item in items]
        varying = [name for name in values[0] if any(other.get(name) != values[0][name] for other in values)] if values else []
        for item, item_values in zip(items, values):
            row = (item["prompt"], item.get("negative_prompt"))
            swept = tuple((name, item_values.get(name)) for name in varying)
            column = (index, swept, item["seed"])
            all_rows.add(row)
            all_columns.add(column)
            if row not in rows and len(rows) < MAX_ROWS:
                rows[row] = len(rows)
            if column not in columns and len(columns) < MAX_COLUMNS:
                label = (f"seed {item['seed']}", *(f"{name} {_number(value)}" for name, value in swept))
                columns[column] = Column(index, (swept, item["seed"]), label)
            if row in rows and column in columns:
                cells[(row, column)] = item["media"]
                if item.get("scores"):
                    scores[(row, column)] = _scores_label(item["scores"])
    scale = min(1.0, CELL_PIXELS / max(image_size))
    cell_size = (max(1, round(image_size[0] * scale)), max(1, round(image_size[1] * scale)))
    column_index = {column: number for number, column in enumerate(columns)}
    header_lines = (2 if len(runs) > 1 else 1) + max((len(column.label) for column in columns.values()), default=0)
    return Layout(
        rows=tuple(rows),
        columns=tuple(columns.values()),
        cells={(rows[row], column_index[column]): uri for (row, column), uri in cells.items()},
        cell_size=cell_size,
        header_lines=header_lines,
        left_out=(len(all_rows) - len(rows), len(all_columns) - len(columns)),
        cell_scores={(rows[row], column_index[column]): text for (row, column), text in scores.items()},
    )


def render_contact_sheet(runs: Sequence[RunManifest], read: Callable[[str], bytes]) -> Image.Image:
    """The sheet of `runs`, reading each media URI with `read`."""
    uris = [item["media"] for run in runs for item in run.manifest["items"]]
    first = next((image for image in (_image(read, uri) for uri in uris[:SIZE_PROBES]) if image is not None), None)
    layout = sheet_layout(runs, first.size if first else (CELL_PIXELS, CELL_PIXELS))
    with ThreadPoolExecutor(max_workers=READERS) as pool:
        images = dict(zip(layout.cells, pool.map(lambda uri: _image(read, uri), layout.cells.values())))
    sheet = Image.new("RGB", layout.size, BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=FONT_SIZE)
    draw.text((PAD, PAD), _title(runs, layout), fill=INK, font=font)
    for number, run in enumerate(runs):
        first_column = next((index for index, column in enumerate(layout.columns) if column.run == number), None)
        if first_column is not None and len(runs) > 1:
            draw.text((layout.column_x(first_column), PAD + LINE_HEIGHT), run.title, fill=INK, font=font)
    top = PAD + (2 if len(runs) > 1 else 1) * LINE_HEIGHT
    for index, column in enumerate(layout.columns):
        for line, text in enumerate(column.label):
            text = _fitted(draw, text, layout.cell_size[0], font)
            draw.text((layout.column_x(index), top + line * LINE_HEIGHT), text, fill=INK, font=font)
    for row, (prompt, negative) in enumerate(layout.rows):
        lines = textwrap.wrap(prompt, width=PROMPT_CHARACTERS) or [""]
        if negative:
            lines.append(f"(not: {negative})")
        y = layout.row_y(row)
        for line, text in enumerate(lines[: max(1, layout.cell_size[1] // LINE_HEIGHT)]):
            draw.text((PAD, y + line * LINE_HEIGHT), text, fill=INK, font=font)
        for column in range(len(layout.columns)):
            box = layout.cell_box(row, column)
            if (row, column) in layout.cell_scores:
                text = _fitted(draw, layout.cell_scores[(row, column)], layout.cell_size[0], font)
                draw.text((box[0], box[3] + 2), text, fill=INK, font=font)
            image = images.get((row, column))
            if image is None:
                draw.rectangle(box, fill=MISSING)
                continue
            image.thumbnail(layout.cell_size)
            sheet.paste(image, (box[0] + (layout.cell_size[0] - image.width) // 2,
                                box[1] + (layout.cell_size[1] - image.height) // 2))
    return sheet


def contact_sheet_png(runs: Sequence[RunManifest], read: Callable[[str], bytes], key: str | None = None) -> bytes:
    """The sheet as PNG bytes; `key` (what it shows) goes into its stagediff metadata chunk."""
    info = PngInfo()
    if key is not None:
        info.add_text(METADATA_KEYWORD.decode(), json.dumps({SHEET_KEY: key}))
    buffer = io.BytesIO()
    render_contact_sheet(runs, read).save(buffer, format="PNG", optimize=True, pnginfo=info)
    return buffer.getvalue()


def write_contact_sheet(store: Store, run_name: str, manifest: dict) -> str:
    """Write `runs/<run_name>/contact-sheet.png` for a run whose media are in `store`; return its URI. A
    sheet of the same items showing the same media files (a rerun that found everything done) is copied
    from the run that drew it, found from listings: only new sheets, or sheets whose media were written
    again since, read media."""
    runs = [RunManifest(manifest["model"], manifest)]
    media = [artifact_path(item["media"]) for item in manifest["items"]]
    listed: dict[str, dict] = {}
    for folder in sorted({path.rsplit("/", 1)[0] for path in media}):
        listed[folder] = store.list_folder(folder)
    # Each media file's listing version (size, times, inode; an object's generation): a file written
    # again under the same path gives the sheet another key.
    versions = [getattr(listed[path.rsplit("/", 1)[0]].get(path.rsplit("/", 1)[1]), "version", None) for path in media]
    key = content_key({"sheet": SHEET_VERSION, "model": manifest["model"],
                       "items": [{**item, "media": path, "media_version": version, "embeddings": None, "latents": None}
                                 for item, path, version in zip(manifest["items"], media, versions)]})
    target = f"runs/{run_name}/{SHEET_NAME}"
    drawn = _sheet_with_key(store, key)
    if drawn == target:
        return store.uri_of(target)
    if drawn is not None:
        return store.copy(drawn, target)
    data = contact_sheet_png(runs, lambda uri: store.read_bytes(artifact_path(uri)), key)
    return store.write_bytes(target, data, {SHEET_KEY: key})


def _sheet_with_key(store: Store, key: str) -> str | None:
    """A run's contact sheet that shows what `key` says, if the store has one."""
    for path, listed in store.walk("runs").items():
        if not path.endswith(f"/{SHEET_NAME}"):
            continue
        try:
            recorded = store.recorded(path, listed).get(SHEET_KEY)
        except (CorruptArtifact, OSError):
            recorded = None
        if recorded == key:
            return path
    return None


def _swept_values(item: dict) -> dict:
    """An item's settings and LoRA scales (named by the LoRA file), the values a grid may sweep."""
    loras = {lora_name(entry["source"]): entry["scale"] for entry in item.get("loras", ())}
    return {**item.get("settings", {}), **loras}


def _image(read: Callable[[str], bytes], uri: str) -> Image.Image | None:
    """The image of a media file (a video's middle frame); None when it is missing or does not decode."""
    try:
        data = read(uri)
        if uri.endswith(".mp4"):
            return Image.fromarray(middle_frame(data))
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")
    except (OSError, ValueError, RuntimeError):
        return None


def _title(runs: Sequence[RunManifest], layout: Layout) -> str:
    titles = [run.title for run in runs]
    models = [model for model in dict.fromkeys(run.manifest.get("model", "") for run in runs) if model not in titles]
    title = " | ".join(titles) + (" · " + ", ".join(models) if models else "")
    rows, columns = layout.left_out
    if rows or columns:
        title += f" (first {len(layout.rows)} prompts and {len(layout.columns)} columns; {rows} prompts and " \
                 f"{columns} columns left out)"
    return title


def _fitted(draw: ImageDraw.ImageDraw, label: str, width: int, font) -> str:
    """A `name value` label shortened to `width` pixels: the name loses its end, the value stays."""
    name, _, value = label.rpartition(" ")
    while name and draw.textlength(label, font=font) > width:
        name = name[:-1]
        label = f"{name}… {value}"
    return label


def _scores_label(scores: dict) -> str:
    """`clip 27.31`: each scorer by its metric (`clip:MODEL` → `clip`), `-` where not scored."""
    return " · ".join(f"{name.partition(':')[0]} {'-' if value is None else f'{value:.2f}'}"
                      for name, value in scores.items())


def _number(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)

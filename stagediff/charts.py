"""Line charts as PNG, drawn with Pillow (matplotlib is not a dependency): score against a swept value
(`stagediff compare`), a sweep's score over time (trends). One line per series, a legend, labelled axes."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

from PIL import Image, ImageDraw, ImageFont

WIDTH, HEIGHT = 720, 420
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 70, 20, 40, 70
FONT_SIZE = 13
COLORS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75))
INK, GRID, BACKGROUND = (20, 20, 20), (225, 225, 225), (255, 255, 255)
MARKER = 4


def line_chart_png(series: Mapping[str, Sequence[tuple[float, float]]], *, title: str, x_label: str, y_label: str,
                   x_ticks: Mapping[float, str] | None = None) -> bytes:
    """A PNG of `series` (name → (x, y) points, drawn in order of x, a marker on each point); `x_ticks`
    labels those x positions (default: each distinct x, as a number)."""
    font = ImageFont.load_default(size=FONT_SIZE)
    image = Image.new("RGB", (WIDTH, HEIGHT), BACKGROUND)
    draw = ImageDraw.Draw(image)
    points = [point for values in series.values() for point in values]
    xs = [x for x, _ in points] or [0.0]
    ys = [y for _, y in points] or [0.0]
    x_low, x_high = _span(min(xs), max(xs))
    y_low, y_high = _span(min(ys), max(ys))
    left, top, right, bottom = MARGIN_LEFT, MARGIN_TOP, WIDTH - MARGIN_RIGHT, HEIGHT - MARGIN_BOTTOM

    def at(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x_low) / (x_high - x_low) * (right - left),
                bottom - (y - y_low) / (y_high - y_low) * (bottom - top))

    for step in range(5):  # horizontal grid lines with the score they mark
        y = y_low + (y_high - y_low) * step / 4
        _, pixel_y = at(x_low, y)
        draw.line((left, pixel_y, right, pixel_y), fill=GRID)
        draw.text((left - 6, pixel_y), f"{y:.4g}", fill=INK, font=font, anchor="rm")
    ticks = x_ticks if x_ticks is not None else {x: f"{x:g}" for x in sorted(set(xs))}
    for x, label in ticks.items():
        pixel_x, _ = at(x, y_low)
        draw.line((pixel_x, bottom, pixel_x, bottom + 4), fill=INK)
        draw.text((pixel_x, bottom + 8), label, fill=INK, font=font, anchor="ma")
    draw.rectangle((left, top, right, bottom), outline=INK)
    draw.text((WIDTH // 2, 12), title, fill=INK, font=font, anchor="ma")
    draw.text(((left + right) // 2, HEIGHT - 22), x_label, fill=INK, font=font, anchor="ma")
    draw.text((8, 6), y_label, fill=INK, font=font)
    for number, (name, values) in enumerate(series.items()):
        color = COLORS[number % len(COLORS)]
        pixels = [at(x, y) for x, y in sorted(values)]
        if len(pixels) > 1:
            draw.line(pixels, fill=color, width=2)
        for x, y in pixels:
            draw.ellipse((x - MARKER, y - MARKER, x + MARKER, y + MARKER), fill=color)
        legend_y = top + 6 + number * (FONT_SIZE + 4)
        draw.line((right - 160, legend_y + 7, right - 140, legend_y + 7), fill=color, width=3)
        draw.text((right - 134, legend_y), name[:24], fill=INK, font=font)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _span(low: float, high: float) -> tuple[float, float]:
    """An axis range around the values, never empty."""
    if high - low < 1e-9:
        return low - 1.0, high + 1.0
    pad = (high - low) * 0.08
    return low - pad, high + pad

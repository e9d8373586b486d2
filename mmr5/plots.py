"""Training curves drawn with pillow (no matplotlib at run time): one panel per metric, stacked vertically.

Pipeline: after the whole data -> processor -> model -> sampler -> rewards -> ppo line; a part of the scaffold
(run.py), which redraws curve.png from metrics.jsonl
after every log.
"""
import math

from PIL import Image, ImageDraw, ImageFont

WIDTH, PANEL, MARGIN = 720, 200, 56
COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]


def _ticks(lo: float, hi: float, count: int = 4) -> list[float]:
    step = (hi - lo) / count or 1.0
    magnitude = 10 ** math.floor(math.log10(step))
    step = min((m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= step), default=step)
    return [i * step for i in range(math.ceil(lo / step), math.floor(hi / step) + 1)]


def plot_curves(records: list[dict], keys: list[str], path, title: str = "", x_key: str = "step"):
    """Save a PNG with one panel per key in `keys` that appears in `records` (plotted against `x_key`)."""
    panels = [(k, [(r[x_key], r[k]) for r in records if isinstance(r.get(k), (int, float)) and math.isfinite(r[k])])
              for k in keys]
    panels = [(k, pts) for k, pts in panels if pts]
    if not panels:
        return
    font = ImageFont.load_default()
    image = Image.new("RGB", (WIDTH, 24 + PANEL * len(panels)), "white")
    draw = ImageDraw.Draw(image)
    draw.text((MARGIN, 6), title, fill="black", font=font)
    xs = [x for _, pts in panels for x, _ in pts]
    x_lo, x_hi = min(xs), max(max(xs), min(xs) + 1)
    for i, (key, pts) in enumerate(panels):
        top = 24 + i * PANEL
        left, right, y0, y1 = MARGIN, WIDTH - 16, top + 12, top + PANEL - 28
        ys = [y for _, y in pts]
        lo, hi = min(ys), max(ys)
        if hi - lo < 1e-9:
            lo, hi = lo - 0.5, hi + 0.5
        X = lambda x: left + (x - x_lo) / (x_hi - x_lo) * (right - left)  # noqa: E731
        Y = lambda y: y1 - (y - lo) / (hi - lo) * (y1 - y0)  # noqa: E731
        draw.rectangle([left, y0, right, y1], outline=(160, 160, 160))
        for t in _ticks(lo, hi):
            draw.line([left - 4, Y(t), left, Y(t)], fill="black")
            draw.text((4, Y(t) - 6), f"{t:.3g}", fill="black", font=font)
        for t in _ticks(x_lo, x_hi):
            draw.line([X(t), y1, X(t), y1 + 4], fill="black")
            draw.text((X(t) - 8, y1 + 6), f"{t:g}", fill="black", font=font)
        color = COLORS[i % len(COLORS)]
        points = [(X(x), Y(y)) for x, y in pts]
        if len(points) > 1:
            draw.line(points, fill=color, width=2)
        for p in points if len(points) < 40 else points[-1:]:
            draw.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=color)
        draw.text((left + 6, y0 + 4), f"{key}  (last {ys[-1]:.4g})", fill=color, font=font)
    image.save(path)

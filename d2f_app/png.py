"""The demo's labelled PNG grid, drawn with Pillow (which every ComfyUI install has).

Kept to what the demo needs: map samples to 8-bit gray, lay them out one labelled row per
(model, method, steps), write the PNG. Labels use Pillow's default font, so the grid reads on its own.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def to_uint8(images, lo: float = -1.0, hi: float = 1.0) -> np.ndarray:
    """Map [lo, hi] to 0…255 (clipped); accepts torch tensors or arrays."""
    if hasattr(images, "detach"):
        images = images.detach().float().cpu().numpy()
    images = (np.asarray(images, dtype=np.float64) - lo) / (hi - lo)
    return np.clip(np.round(images * 255.0), 0, 255).astype(np.uint8)


def image_grid(rows, labels=None, pad: int = 2, scale: int = 2, background: int = 32, text: int = 255) -> Image.Image:
    """One grayscale canvas: row r holds the images ``rows[r]`` (each (k, h, w) uint8), enlarged ``scale``×
    (nearest), prefixed with ``labels[r]`` in Pillow's default font."""
    rows = [np.asarray(r) for r in rows]
    h = max(r.shape[1] for r in rows) * scale
    w = max(r.shape[2] for r in rows) * scale
    cols = max(r.shape[0] for r in rows)
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("L", (1, 1)))
    boxes = [measure.textbbox((0, 0), s, font=font) for s in labels] if labels else []
    label_w = max(b[2] for b in boxes) + 2 * pad if boxes else 0
    canvas = Image.new("L", (label_w + cols * (w + pad) + pad, len(rows) * (h + pad) + pad), background)
    draw = ImageDraw.Draw(canvas)
    for r, imgs in enumerate(rows):
        top = pad + r * (h + pad)
        if labels:
            box = boxes[r]
            draw.text((pad, top + (h - (box[3] - box[1])) // 2 - box[1]), labels[r], fill=text, font=font)
        for c, img in enumerate(imgs):
            tile = Image.fromarray(img).resize((img.shape[1] * scale, img.shape[0] * scale), Image.NEAREST)
            canvas.paste(tile, (label_w + pad + c * (w + pad), top))
    return canvas


def write_png(path, image: Image.Image) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path

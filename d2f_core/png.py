"""A minimal PNG writer (zlib + struct, no PIL): 8-bit grayscale or RGB, no interlace.

Also a 3×5 bitmap font so image grids can carry their own row labels.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, data: bytes) -> bytes:
    # The CRC covers the chunk type and data, not the length (PNG spec §5.3).
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of a uint8 array (H, W) grayscale, or (H, W, 3) RGB."""
    image = np.ascontiguousarray(image)
    if image.dtype != np.uint8:
        raise TypeError(f"encode_png wants uint8 pixels, got {image.dtype}")
    if image.ndim == 2:
        color_type, channels = 0, 1
    elif image.ndim == 3 and image.shape[2] == 3:
        color_type, channels = 2, 3
    else:
        raise ValueError(f"encode_png wants (H, W) or (H, W, 3), got {image.shape}")
    height, width = image.shape[:2]
    if height < 1 or width < 1:
        raise ValueError("an image needs at least one pixel")
    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    # Each scanline is prefixed with its filter type; 0 (none) keeps the writer trivial, zlib does the rest.
    rows = image.reshape(height, width * channels)
    raw = np.concatenate([np.zeros((height, 1), np.uint8), rows], axis=1).tobytes()
    return PNG_SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw, 9)) + _chunk(b"IEND", b"")


def write_png(path, image: np.ndarray) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_png(image))
    return path


def to_uint8(images, lo: float = -1.0, hi: float = 1.0) -> np.ndarray:
    """Map [lo, hi] to 0…255 (clipped); accepts torch tensors or arrays."""
    if hasattr(images, "detach"):
        images = images.detach().float().cpu().numpy()
    images = (np.asarray(images, dtype=np.float64) - lo) / (hi - lo)
    return np.clip(np.round(images * 255.0), 0, 255).astype(np.uint8)


# 3×5 glyphs, rows top to bottom, "#" = ink. Enough for labels like "EPS DDIM 25" or "V-PRED FLOW 4".
_FONT_ROWS = {
    "A": ("###", "#.#", "###", "#.#", "#.#"), "B": ("##.", "#.#", "##.", "#.#", "##."),
    "C": ("###", "#..", "#..", "#..", "###"), "D": ("##.", "#.#", "#.#", "#.#", "##."),
    "E": ("###", "#..", "##.", "#..", "###"), "F": ("###", "#..", "##.", "#..", "#.."),
    "G": ("###", "#..", "#.#", "#.#", "###"), "H": ("#.#", "#.#", "###", "#.#", "#.#"),
    "I": ("###", ".#.", ".#.", ".#.", "###"), "J": ("..#", "..#", "..#", "#.#", "###"),
    "K": ("#.#", "#.#", "##.", "#.#", "#.#"), "L": ("#..", "#..", "#..", "#..", "###"),
    "M": ("#.#", "###", "###", "#.#", "#.#"), "N": ("##.", "#.#", "#.#", "#.#", "#.#"),
    "O": ("###", "#.#", "#.#", "#.#", "###"), "P": ("###", "#.#", "###", "#..", "#.."),
    "Q": ("###", "#.#", "#.#", "###", "..#"), "R": ("##.", "#.#", "##.", "#.#", "#.#"),
    "S": ("###", "#..", "###", "..#", "###"), "T": ("###", ".#.", ".#.", ".#.", ".#."),
    "U": ("#.#", "#.#", "#.#", "#.#", "###"), "V": ("#.#", "#.#", "#.#", "#.#", ".#."),
    "W": ("#.#", "#.#", "###", "###", "#.#"), "X": ("#.#", "#.#", ".#.", "#.#", "#.#"),
    "Y": ("#.#", "#.#", ".#.", ".#.", ".#."), "Z": ("###", "..#", ".#.", "#..", "###"),
    "0": ("###", "#.#", "#.#", "#.#", "###"), "1": (".#.", "##.", ".#.", ".#.", "###"),
    "2": ("###", "..#", "###", "#..", "###"), "3": ("###", "..#", ".##", "..#", "###"),
    "4": ("#.#", "#.#", "###", "..#", "..#"), "5": ("###", "#..", "###", "..#", "###"),
    "6": ("###", "#..", "###", "#.#", "###"), "7": ("###", "..#", "..#", "..#", "..#"),
    "8": ("###", "#.#", "###", "#.#", "###"), "9": ("###", "#.#", "###", "..#", "###"),
    "-": ("...", "...", "###", "...", "..."), ".": ("...", "...", "...", "...", ".#."),
    "/": ("..#", "..#", ".#.", "#..", "#.."), ":": ("...", ".#.", "...", ".#.", "..."),
    "=": ("...", "###", "...", "###", "..."), " ": ("...", "...", "...", "...", "..."),
}
GLYPH_W, GLYPH_H = 3, 5


def render_text(text: str, scale: int = 1) -> np.ndarray:
    """A bool mask (5·scale, 4·len·scale) of ``text`` in the 3×5 font; unknown characters render as blanks."""
    text = text.upper()
    mask = np.zeros((GLYPH_H, max(1, (GLYPH_W + 1) * len(text))), dtype=bool)
    for i, ch in enumerate(text):
        rows = _FONT_ROWS.get(ch, _FONT_ROWS[" "])
        for r, row in enumerate(rows):
            for c, px in enumerate(row):
                mask[r, i * (GLYPH_W + 1) + c] = px == "#"
    return mask.repeat(scale, 0).repeat(scale, 1)


def image_grid(rows, labels=None, pad: int = 2, scale: int = 2, background: int = 32, text: int = 255) -> np.ndarray:
    """One uint8 grayscale canvas: row r holds the images ``rows[r]`` (each (k, h, w) uint8), prefixed
    with ``labels[r]`` drawn in the 3×5 font. Images are enlarged ``scale``× (nearest)."""
    rows = [np.asarray(r) for r in rows]
    h = max(r.shape[1] for r in rows) * scale
    w = max(r.shape[2] for r in rows) * scale
    cols = max(r.shape[0] for r in rows)
    text_scale = max(1, h // (2 * GLYPH_H))
    label_w = 0
    if labels:
        label_w = max(render_text(s, text_scale).shape[1] for s in labels) + 2 * pad
    canvas = np.full((len(rows) * (h + pad) + pad, label_w + cols * (w + pad) + pad), background, np.uint8)
    for r, imgs in enumerate(rows):
        top = pad + r * (h + pad)
        if labels:
            mask = render_text(labels[r], text_scale)
            y = top + (h - mask.shape[0]) // 2
            canvas[y:y + mask.shape[0], pad:pad + mask.shape[1]][mask] = text
        for c, img in enumerate(imgs):
            big = img.repeat(scale, 0).repeat(scale, 1)
            left = label_w + pad + c * (w + pad)
            canvas[top:top + big.shape[0], left:left + big.shape[1]] = big
    return canvas

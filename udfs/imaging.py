"""Robust image decoding: any bytes in, an RGB PIL image or an error string out.

Nothing here raises on bad input. Undecodable, truncated, empty or oversized images come back
as ``(None, "reason")``; CMYK, palette, alpha, 16-bit, bilevel and animated images are
converted to 8-bit RGB (alpha composited on white, the first frame of an animation).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps

DEFAULT_MAX_PIXELS = 64_000_000
WHITE = (255, 255, 255)

# The pixel limit is each call's own ``max_pixels``, checked from the header before any pixel is
# decoded. PIL's process-wide ``MAX_IMAGE_PIXELS`` would make one caller's limit leak into every
# later decode in the worker (and warn or raise there), so it is switched off once, here.
Image.MAX_IMAGE_PIXELS = None


def decode_rgb(data: bytes | None, max_pixels: int = DEFAULT_MAX_PIXELS,
               exif_transpose: bool = False,
               min_side: int = 0) -> tuple[Image.Image | None, str | None]:
    """Decode ``data`` to an RGB image; returns ``(image, None)`` or ``(None, error)``.

    ``min_side > 0`` lets a JPEG decode at the smallest libjpeg DCT scale (1/2, 1/4, 1/8) whose
    result keeps both sides >= ``min_side`` (PIL's ``draft``): most of the decode work is skipped
    and the caller's own resize then starts from a smaller image. Other formats, and JPEGs
    already near ``min_side``, decode at full size. The pixel limit applies to the full size.
    A reduced image carries its full ``(width, height)`` in ``info["full_size"]``, so a resize
    can reproduce the geometry of the full decode exactly (see ``udfs.score``).
    """
    if data is None or len(data) == 0:
        return None, "empty: no image bytes"
    try:
        img = Image.open(io.BytesIO(bytes(data)))
        w, h = img.size
        if w * h > max_pixels:
            return None, f"too_large: {w}x{h} exceeds max_image_pixels={max_pixels}"
        if min_side > 0 and img.format == "JPEG" and not exif_transpose:
            img.draft(None, (min_side, min_side))
        img.load()
        if exif_transpose:
            img = ImageOps.exif_transpose(img)
        rgb = to_rgb(img)
        if rgb.size != (w, h) and not exif_transpose:
            rgb.info["full_size"] = (w, h)
        return rgb, None
    except Image.DecompressionBombError as exc:
        return None, f"too_large: {exc}"
    except Image.UnidentifiedImageError:
        return None, "undecodable: not a recognised image format"
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a per-row error
        return None, f"decode_error: {type(exc).__name__}: {exc}"[:500]


def decode(blob: bytes, preprocess):
    """Image bytes -> ``preprocess(image)`` (a model input tensor), or None when the bytes do not
    decode. Decoding is :func:`decode_rgb`'s, the scoring step's, so training sees what scoring
    sees."""
    img, _ = decode_rgb(blob)
    return None if img is None else preprocess(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (alpha on white, high bit depths scaled down)."""
    if getattr(img, "is_animated", False):
        img.seek(0)
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith(("I", "F")):
        return _high_depth_to_rgb(img)
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode in ("LA", "PA", "La", "RGBa"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        background = Image.new("RGB", img.size, WHITE)
        background.paste(img, mask=img.getchannel("A"))
        return background
    return img.convert("RGB")


def _high_depth_to_rgb(img: Image.Image) -> Image.Image:
    """16/32-bit integer or float grayscale -> 8-bit RGB, keeping the tonal range."""
    arr = np.asarray(img, dtype=np.float64)
    if img.mode == "F":
        top = 1.0 if arr.size and np.nanmax(arr) <= 1.0 else 255.0
        arr = arr / top * 255.0
    elif img.mode.startswith("I;16") or (arr.size and arr.max() > 255):
        arr = arr / 257.0
    arr = np.nan_to_num(np.clip(arr, 0, 255)).round().astype(np.uint8)
    return Image.fromarray(arr).convert("RGB")

"""Literal images: encoded bytes for decode, scoring, ingest and pixel-cap tests."""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image

SMALL_CAP = 1_000  # a pixel cap that a 96x64 image (6,144 px) is over


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    """``img`` saved as ``fmt`` (a PIL format name) into bytes."""
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def jpeg(color=(200, 30, 30), size=(96, 64)) -> bytes:
    """A flat-colour JPEG at quality 90."""
    return encode(Image.new("RGB", size, color), "JPEG", quality=90)


def tiny_jpeg(w: int = 32, h: int = 24, color=(200, 10, 10)) -> bytes:
    """A small flat-colour JPEG at PIL's default quality (ingest's literal shards)."""
    return encode(Image.new("RGB", (w, h), color), "JPEG")


def busy_jpeg() -> bytes:
    """96x64 with a gradient (a flat image has no thumbnail vector at all)."""
    img = Image.new("RGB", (96, 64))
    img.putdata([(x * 2, y * 3, (x + y) % 256) for y in range(64) for x in range(96)])
    return encode(img, "JPEG", quality=90)


def header_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A few hundred bytes of PNG whose header claims width x height pixels."""
    data = bytearray(encode(Image.new("L", (1, 1)), "PNG"))
    ihdr = bytes(data[16:29])
    ihdr = struct.pack(">II", width, height) + ihdr[8:]
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)

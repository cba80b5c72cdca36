"""Stream WebDataset / img2dataset tar shards (plain ``.tar`` or gzip ``.tar.gz``/``.tgz``) into
records, on the executors, with size caps.

A shard is read member by member, once, and consecutive members sharing a key form one record.
Nothing hostile is loaded: a member over ``max_member_bytes`` is skipped (its record is
quarantined, naming the shard, the member, its size and the key to raise); a shard whose file
is over ``max_shard_bytes`` is not opened (one quarantine record for the whole shard), and one
that grows past it while decompressing stops there (one record for the rest). A key seen
earlier in the same shard is a duplicate key, not a missing member.
"""

from __future__ import annotations

import io
import json
import posixpath
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass

import pandas as pd
from PIL import Image
from pyspark.sql import types as T

from etl.fs import Store

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
SHARD_GLOB = "*.{tar,tar.gz,tgz}"
TAR_SCHEMA = T.StructType([
    T.StructField("key", T.StringType()), T.StructField("text", T.StringType()),
    T.StructField("image", T.BinaryType()), T.StructField("json", T.StringType()),
    T.StructField("source_file", T.StringType()), T.StructField("source_pos", T.LongType()),
    T.StructField("error", T.StringType()), T.StructField("raw", T.StringType()),
    T.StructField("image_width", T.IntegerType()), T.StructField("image_height", T.IntegerType()),
])
SIZES = {"image_width": "Int32", "image_height": "Int32"}
RECORDS_PER_BATCH = 256  # tar records per Arrow batch: a shard is streamed, never held whole
BATCH_BYTES = 64 * 1024 * 1024  # ... and a batch is flushed early once it holds this many bytes


@dataclass(frozen=True)
class TarCaps:
    """Size caps for one source's shards (``ingest.sources[].max_member_bytes`` / ``_shard_``)."""

    member_bytes: int
    shard_bytes: int


def utf8_reason(field: str, where: str) -> str:
    """The one quarantine reason every reader gives for bytes that are not UTF-8."""
    return f"{field}: not valid UTF-8 ({where})"


def header_size(data: bytes | None) -> tuple[int | None, int | None]:
    """Width and height from an image's header (no pixels decoded); ``(None, None)`` when
    there are no bytes or the header cannot be read (scoring reports the error)."""
    if data is None:
        return None, None
    try:
        return Image.open(io.BytesIO(data)).size
    except Exception:  # noqa: BLE001 - any unreadable header
        return None, None


def read_shards(batches: Iterator[pd.DataFrame], store: Store,
                caps: TarCaps) -> Iterator[pd.DataFrame]:
    """``mapInPandas`` body: rows ``path, length`` of shard files in, :data:`TAR_SCHEMA` out
    (image sizes read from the headers here, while the bytes are in hand)."""
    cols = TAR_SCHEMA.fieldNames()
    for batch in batches:
        for path, length in zip(batch["path"], batch["length"], strict=True):
            rows: list[dict] = []
            held = 0
            for rec in shard_records(path, int(length), store, caps):
                rec["image_width"], rec["image_height"] = header_size(rec.get("image"))
                rows.append(rec)
                held += len(rec.get("image") or b"") + len(rec.get("text") or "")
                if len(rows) == RECORDS_PER_BATCH or held >= BATCH_BYTES:
                    yield pd.DataFrame(rows, columns=cols).astype(SIZES)
                    rows, held = [], 0
            if rows:
                yield pd.DataFrame(rows, columns=cols).astype(SIZES)


def _split_name(name: str) -> tuple[str, str]:
    """``dir/key.ext.more`` -> (``dir/key``, ``ext.more`` lowercased)."""
    base = posixpath.basename(name)
    key = posixpath.join(posixpath.dirname(name), base.split(".", 1)[0])
    return key, (base.split(".", 1)[1].lower() if "." in base else "")


def _shard_error(path: str, key: str | None, pos: int, error: str) -> dict:
    return {"key": key, "text": None, "image": None, "json": None, "source_file": path,
            "source_pos": pos, "error": error, "raw": None}


def shard_records(path: str, length: int, store: Store, caps: TarCaps) -> Iterator[dict]:
    """One record per key of the shard at ``path`` (``length`` bytes), in shard order."""
    if length > caps.shard_bytes:
        yield _shard_error(path, None, 0, (
            f"shard {path} is {length} bytes, over max_shard_bytes {caps.shard_bytes}: not read; "
            "raise ingest.sources[].max_shard_bytes to ingest it"))
        return
    seen: dict[str, int] = {}  # key -> position, for this shard only
    key, pos, total = None, -1, 0
    group: dict[str, bytes] = {}
    errors: list[str] = []
    try:
        with store.open(path, "rb") as fh, tarfile.open(fileobj=fh, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                k, ext = _split_name(member.name)
                if k != key:
                    if key is not None:
                        yield tar_record(path, key, pos, group, errors)
                    key, pos, group, errors = k, pos + 1, {}, []
                    if k in seen:
                        errors.append(f"duplicate key {k} in shard {path}; first at position {seen[k]}")
                    else:
                        seen[k] = pos
                total += member.size
                if total > caps.shard_bytes:
                    errors.append(
                        f"shard {path} holds over max_shard_bytes {caps.shard_bytes} bytes once "
                        f"decompressed; key {k} and the rest of the shard not read; raise "
                        "ingest.sources[].max_shard_bytes to ingest it")
                    break
                problems = _member_errors(path, member, ext, group, caps)
                errors.extend(problems)
                if not problems:  # only members under the cap are ever read into memory
                    group[ext] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        yield _shard_error(path, key, pos + 1, f"corrupt tar after key {key!r}: {exc}")
    if key is not None:
        yield tar_record(path, key, pos, group, errors)


def _member_errors(path: str, member: tarfile.TarInfo, ext: str, group: dict[str, bytes],
                   caps: TarCaps) -> list[str]:
    """Why ``member`` cannot join its key's record (too big, or a second copy of an extension)."""
    if member.size > caps.member_bytes:
        return [f"member {member.name} of shard {path} is {member.size} bytes, over "
                f"max_member_bytes {caps.member_bytes}: not loaded; raise "
                "ingest.sources[].max_member_bytes to ingest it"]
    if ext in group:
        return [f"duplicate member {member.name} in shard {path}"]
    return []


def tar_record(path: str, key: str, pos: int, group: dict[str, bytes], errors: list[str]) -> dict:
    """The record of one key: image bytes, caption, JSON text, and every problem found."""
    rec = {"key": key, "source_file": path, "source_pos": pos, "error": None,
           "raw": ", ".join(sorted(group)), "json": None, "text": None, "image": None}
    errors = list(errors)
    ext = next((e for e in IMAGE_EXTS if e in group), None)
    if ext is None and not errors:
        errors.append(f"missing image member (.jpg/.png/.webp) for key {key}")
    elif ext is not None:
        rec["image"] = group[ext]
    if "txt" in group:
        rec["text"] = _utf8(group["txt"], "text", f"member {key}.txt", errors)
    if "json" in group:
        text = _utf8(group["json"], "json", f"member {key}.json", errors)
        try:
            if text is not None:
                json.loads(text)
                rec["json"] = text
        except ValueError as exc:
            errors.append(f"{key}.json is not valid JSON: {exc}")
    rec["error"] = "; ".join(errors) or None
    return rec


def _utf8(data: bytes, field: str, where: str, errors: list[str]) -> str | None:
    """``data`` decoded, or None with the UTF-8 reason appended to ``errors``."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        errors.append(utf8_reason(field, f"{where}, byte {exc.start}"))
        return None

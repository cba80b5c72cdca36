"""One way to read and write files at any URL from Python: local paths, ``file:``, ``s3a://``,
``s3://``, ``abfss://``, ``gs://``, ``dbfs:/`` and UC volumes.

Spark reads and writes DataFrames through its Hadoop filesystems; everything written with
plain Python (tar shards, ``uids.npy``, manifests, the sample pool, the report) goes through
:class:`Store`, an fsspec wrapper whose credentials come from the same ``spark.hadoop.fs.s3a.*``
keys the Hadoop side uses (or the environment, as both read it). A ``Store`` is a small
picklable value, so driver code passes it into ``mapInPandas`` bodies and each executor opens
files itself: nothing is funnelled through the driver.
"""

from __future__ import annotations

import os
import posixpath
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

# URL scheme -> (fsspec protocol, the package providing it, the Hadoop connector)
SCHEMES = {
    "s3a": ("s3", "s3fs", "org.apache.hadoop:hadoop-aws (added automatically for s3a://)"),
    "s3": ("s3", "s3fs", "hadoop-aws (prefer s3a:// with Spark)"),
    "abfss": ("abfss", "adlfs", "hadoop-azure"),
    "abfs": ("abfs", "adlfs", "hadoop-azure"),
    "gs": ("gs", "gcsfs", "the GCS connector (gcs-connector-hadoop3)"),
}
S3A_PREFIX = "spark.hadoop.fs.s3a."


def is_url(path: str) -> bool:
    """True for ``scheme://...`` and ``dbfs:/...`` locations, which must not be resolved locally."""
    return "://" in path or path.startswith("dbfs:")


def scheme(path: str) -> str:
    """The URL scheme of ``path`` (``""`` for a plain local path, ``file`` for ``file:``)."""
    if path.startswith(("dbfs:", "file:")):
        return path.split(":", 1)[0]
    return path.split("://", 1)[0].lower() if "://" in path else ""


def join(base: str, *parts: str) -> str:
    """Join URL or path segments with ``/`` (never ``os.path``: URLs keep their scheme)."""
    out = base.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}" if p else out
    return out


def locate(root: str, path: str) -> str:
    """A configured location: a URL or absolute path as is, a relative one joined under ``root``."""
    if is_url(path):
        return path
    if Path(path).expanduser().is_absolute():
        return str(Path(path).expanduser())
    return join(root, path)


def parent(path: str) -> str:
    """The folder holding ``path``."""
    return path.rstrip("/").rsplit("/", 1)[0]


def basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def location_key(path: str) -> str:
    """A comparable form of a location: local paths (``file:``, ``dbfs:`` on a node, relative)
    absolute and normalised; URLs with ``.``/``..`` and trailing slashes removed, ``s3a`` as
    ``s3``. Two spellings of one folder get one key."""
    local = local_path(path)
    if local is not None:
        return os.path.normpath(local)
    head, rest = path.split("://", 1) if "://" in path else path.split(":", 1)
    head = "s3" if head.lower() == "s3a" else head.lower()
    return f"{head}://" + posixpath.normpath("/" + rest).lstrip("/")


def is_within(path: str, folder: str) -> bool:
    """True when ``path`` is ``folder`` or lies below it (compared by :func:`location_key`)."""
    p, f = location_key(path), location_key(folder)
    return p == f or p.startswith(f.rstrip("/") + "/")


def ancestors(path: str) -> list[str]:
    """``path`` and every folder above it, nearest first (a URL's stop at its bucket)."""
    local = local_path(path)
    if local is not None:
        out = [os.path.normpath(local)]
        while os.path.dirname(out[-1]) != out[-1]:
            out.append(os.path.dirname(out[-1]))
        return out
    head, sep, rest = path.partition("://") if "://" in path else path.partition(":")
    sep = sep if sep == "://" else ":/"
    parts = [p for p in posixpath.normpath("/" + rest).split("/") if p]
    return [head + sep + "/".join(parts[:i]) for i in range(len(parts), 0, -1)]


def local_path(path: str) -> str | None:
    """``path`` as a local filesystem path, or None when it is a remote URL.

    ``file:`` URLs (as Hadoop prints them) and ``dbfs:/`` on a Databricks node (FUSE-mounted
    at ``/dbfs``) are local; so are UC volumes (``/Volumes/...``).
    """
    if path.startswith("file:"):
        rest = path[5:]
        return "/" + rest.lstrip("/") if rest.startswith("//") or rest.startswith("/") else rest
    if path.startswith("dbfs:") and os.path.isdir("/dbfs"):
        return "/dbfs/" + path[5:].lstrip("/")
    return None if is_url(path) else os.path.abspath(os.path.expanduser(path))


def s3_options(conf: dict[str, str]) -> dict[str, Any]:
    """s3fs storage options from ``spark.hadoop.fs.s3a.*`` keys (endpoint, keys, path style)."""
    get = {k[len(S3A_PREFIX):]: v for k, v in conf.items() if k.startswith(S3A_PREFIX)}.get
    opts: dict[str, Any] = {}
    if get("access.key") and get("secret.key"):
        opts["key"], opts["secret"] = get("access.key"), get("secret.key")
    if get("session.token"):
        opts["token"] = get("session.token")
    client: dict[str, Any] = {}
    if get("endpoint"):
        endpoint = get("endpoint")
        if "://" not in endpoint:
            ssl = str(get("connection.ssl.enabled", "true")).lower() != "false"
            endpoint = ("https://" if ssl else "http://") + endpoint
        client["endpoint_url"] = endpoint
    if get("endpoint.region"):
        client["region_name"] = get("endpoint.region")
    config: dict[str, Any] = {"retries": {"max_attempts": int(get("attempts.maximum", "3")),
                                          "mode": "standard"},
                              "connect_timeout": _seconds(get("connection.establish.timeout",
                                                              "5s")),
                              "read_timeout": _seconds(get("connection.timeout", "60s"))}
    if str(get("path.style.access", "false")).lower() == "true":
        config["s3"] = {"addressing_style": "path"}
    opts["client_kwargs"], opts["config_kwargs"] = client, config
    return opts


def _seconds(value: str) -> float:
    """A Hadoop duration (``5s``, ``200ms``, ``60000`` = ms) in seconds."""
    v = str(value).strip().lower()
    for suffix, scale in (("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0)):
        if v.endswith(suffix) and v[: -len(suffix)].replace(".", "", 1).isdigit():
            return float(v[: -len(suffix)]) * scale
    return float(v) / 1000.0


@dataclass(frozen=True)
class Store:
    """fsspec access to any URL, with per-protocol storage options (picklable)."""

    options: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)  # credentials

    @classmethod
    def from_conf(cls, conf: dict[str, str]) -> Store:
        """Options from Spark-style keys (the YAML's ``spark.conf`` or a live session's conf)."""
        return cls({"s3": s3_options(conf)})

    @classmethod
    def from_spark(cls, spark) -> Store:
        """Options from the running session's conf (YAML and spark-submit ``--conf`` alike)."""
        from etl.compat import conf_items

        return cls.from_conf(conf_items(spark))

    def fs(self, path: str):
        """(fsspec filesystem, path within it) for ``path``."""
        import fsspec

        local = local_path(path)
        if local is not None:
            return fsspec.filesystem("file"), local
        sch = scheme(path)
        proto = SCHEMES.get(sch, (sch, None, None))[0]
        try:
            fs = fsspec.filesystem(proto, **self.options.get(proto, {}))
        except (ImportError, ValueError) as exc:
            raise ConnectorError(_missing(sch, "", str(exc))) from exc
        return fs, fs._strip_protocol(path)

    def open(self, path: str, mode: str = "rb", **kw) -> IO:
        """A file object for ``path`` (parent folders are created for local writes)."""
        fs, p = self.fs(path)
        if "w" in mode and local_path(path) is not None:
            os.makedirs(posixpath.dirname(p) or ".", exist_ok=True)
        return fs.open(p, mode, **kw)

    def exists(self, path: str) -> bool:
        fs, p = self.fs(path)
        return fs.exists(p)

    def read_bytes(self, path: str) -> bytes:
        with self.open(path, "rb") as fh:
            return fh.read()

    def write_bytes(self, path: str, data: bytes) -> None:
        """Write ``data`` in one object PUT (atomic on object stores; temp + rename locally)."""
        local = local_path(path)
        if local is not None:
            os.makedirs(os.path.dirname(local) or ".", exist_ok=True)
            tmp = f"{local}.tmp-{os.getpid()}"
            with open(tmp, "wb") as fh:
                fh.write(data)
            os.replace(tmp, local)
            return
        fs, p = self.fs(path)
        fs.pipe_file(p, data)

    def write_text(self, path: str, text: str) -> None:
        self.write_bytes(path, text.encode("utf-8"))

    def listdir(self, path: str) -> list[str]:
        """Names (not paths) directly under ``path``; empty if it does not exist."""
        fs, p = self.fs(path)
        try:
            return sorted(basename(e) for e in fs.ls(p, detail=False))
        except FileNotFoundError:
            return []

    def rm(self, path: str) -> None:
        """Remove a file or a whole folder/prefix; missing is fine."""
        local = local_path(path)
        if local is not None:
            if os.path.isdir(local):
                shutil.rmtree(local, ignore_errors=True)
            elif os.path.exists(local):
                os.remove(local)
            return
        fs, p = self.fs(path)
        try:
            fs.rm(p, recursive=True)
        except FileNotFoundError:
            pass

    def concat(self, parts: Iterable[str], dest: str, header: bytes = b"") -> None:
        """Write ``header`` then each part, streamed, into ``dest`` (one object)."""
        with self.open(dest, "wb") as out:
            out.write(header)
            for part in parts:
                with self.open(part, "rb") as fh:
                    shutil.copyfileobj(fh, out, 8 << 20)

    def check(self, path: str, key: str) -> None:
        """Fail now, naming ``key``, when no Python filesystem serves ``path``'s scheme."""
        if local_path(path) is not None:
            return
        sch = scheme(path)
        if sch == "dbfs":
            raise ConnectorError(f"{key}: a dbfs:/ URL but /dbfs is not mounted on this node; "
                                 "run on Databricks or use an s3a:// / abfss:// URL")
        import fsspec

        proto = SCHEMES.get(sch, (sch, None, None))[0]
        try:
            fsspec.get_filesystem_class(proto)
        except (ImportError, ValueError) as exc:
            raise ConnectorError(_missing(sch, key, str(exc))) from exc


class ConnectorError(ValueError):
    """A URL whose scheme has no filesystem connector installed."""


def _missing(sch: str, key: str, detail: str) -> str:
    pkg = SCHEMES.get(sch, (None, None, None))[1]
    fix = (f"pip install {pkg}" if pkg else
           f"use one of {', '.join(sorted(SCHEMES))}, dbfs:/ or a local path")
    where = f"{key}: " if key else ""
    from etl.redact import redact_text

    return redact_text(f"{where}no filesystem connector for URL scheme {sch!r} ({fix}); "
                       f"{detail[:200]}")

"""The one module that knows whether a session is classic (a JVM in this process) or Spark
Connect (a client of a remote server: Databricks serverless, Unity Catalog shared clusters,
``spark.remote``), and the only one allowed to touch the JVM.

Everything else in ``etl/`` and ``udfs/`` uses the DataFrame API, ``spark.conf`` and SQL, which
work in both modes; ``tests/test_imports.py`` fails when ``sparkContext``, ``_jvm``, ``_jsc``,
``_jdf`` or ``.rdd`` appear outside :data:`JVM_ALLOWED`.
"""

from __future__ import annotations

import hashlib
import io
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from pyspark.sql import SparkSession
from pyspark.sql import types as T

# Files that may use the JVM, and why (checked by tests/test_imports.py).
JVM_ALLOWED = {
    "etl/compat.py": "this module: each use is behind a classic-session check",
    "etl/jobs/build_archive.py": "builds the local driver JVM's class archive (make venv; "
                                 "local classic Spark only, never on a cluster or over Connect)",
}

# Arrays up to this size travel inside a UDF's closure; bigger ones are staged as a file and
# read once per Python worker (a closure is re-sent with every task).
CLOSURE_BYTES = 4 * 1024 * 1024


def is_connect(spark: SparkSession) -> bool:
    """True for a Spark Connect session (no JVM in this process)."""
    return type(spark).__module__.startswith("pyspark.sql.connect")


def set_log_level(spark: SparkSession, level: str) -> None:
    """The driver's log level; a Connect server's logging is the server's own business."""
    if not is_connect(spark):
        spark.sparkContext.setLogLevel(level)


def master(spark: SparkSession) -> str:
    """The session's master URL (``local[2]``, ``spark://...``; '' when the server hides it)."""
    return spark.conf.get("spark.master", "") or ""


def conf_items(spark: SparkSession) -> dict[str, str]:
    """Every conf the session reports: its SQL confs and the Spark confs it started with
    (``spark.hadoop.*`` included), in both modes."""
    try:
        return dict(spark.conf.getAll)
    except Exception:  # noqa: BLE001 - a server that refuses to list them: none known
        return {}


def submitted_conf_keys() -> frozenset[str]:
    """The conf keys spark-submit (``--conf``, spark-defaults.conf) set already (spark-submit
    starts the driver JVM before Python: this reads its conf through the gateway)."""
    from pyspark import SparkConf as JvmConf
    from pyspark import SparkContext

    SparkContext._ensure_initialized()
    return frozenset(k for k, _ in JvmConf().getAll())


def missing_filesystem(spark: SparkSession, url: str) -> str | None:
    """Why Spark has no Hadoop filesystem for ``url``'s scheme, or None when it has one.

    Classic: asks the driver JVM for the class (no request to the store). Connect: the server
    resolves a path that cannot exist below ``url``: "path not found" means the filesystem is
    there, an ``UnsupportedFileSystemException`` that it is not."""
    if not is_connect(spark):
        jvm = spark.sparkContext._jvm
        hconf = spark.sparkContext._jsc.hadoopConfiguration()
        try:
            jvm.org.apache.hadoop.fs.FileSystem.getFileSystemClass(urlsplit(url).scheme, hconf)
        except Exception as exc:  # noqa: BLE001 - py4j wraps UnsupportedFileSystemException
            return str(exc).splitlines()[0][:200]
        return None
    probe = url.rstrip("/") + f"/_dfn_probe_{uuid.uuid4().hex}"
    try:
        spark.read.format("text").load(probe).columns  # noqa: B018 - analysed on the server
    except Exception as exc:  # noqa: BLE001 - any other failure is the store's, checked later
        text = str(exc)
        if "UnsupportedFileSystem" in text or "No FileSystem for scheme" in text:
            return text.splitlines()[0][:200]
    return None


@dataclass(frozen=True)
class Staging:
    """A folder (any URL) that the client writes and every Spark worker reads, with the
    :class:`etl.fs.Store` that reaches it: how data too big for a closure reaches the workers,
    and how Connect reads what only the client holds."""

    folder: str
    store: Any

    def path(self, name: str) -> str:
        return f"{self.folder.rstrip('/')}/{name}"


def json_lines_schema(spark: SparkSession, lines: list[str],
                      stage: Staging | None = None) -> T.StructType:
    """Spark's JSON inference over ``lines``. Classic: an in-memory dataset. Connect (which
    reads JSON from files only): the lines are written to a file under ``stage``, read, and
    removed."""
    if not is_connect(spark):
        return spark.read.json(spark.sparkContext.parallelize(lines, 1)).schema
    if stage is None:
        raise ValueError("inferring a JSON schema over Spark Connect needs a staging folder")
    path = stage.path(f"json-sample-{uuid.uuid4().hex}.jsonl")
    stage.store.write_text(path, "\n".join(lines) + "\n")
    try:
        return spark.read.json(path).schema
    finally:
        stage.store.rm(path)


class Shared:
    """Numpy arrays a UDF needs on every Python worker, in either mode (no broadcast, which
    Connect lacks): up to :data:`CLOSURE_BYTES` (or with no ``stage``) they travel in the
    UDF's closure; larger ones are written once as an ``.npz`` under ``stage`` (named by
    content: a re-run reuses it) and loaded once per worker. ``value``: the arrays, as given."""

    def __init__(self, arrays: tuple, stage: Staging | None = None):
        import numpy as np

        arrays = tuple(np.ascontiguousarray(a) for a in arrays)
        self._arrays: tuple | None = arrays
        self._path: str | None = None
        self._store = None if stage is None else stage.store
        if sum(a.nbytes for a in arrays) > CLOSURE_BYTES and stage is not None:
            buf = io.BytesIO()
            np.savez(buf, *arrays)
            data = buf.getvalue()
            self._path = stage.path(f"{hashlib.sha256(data).hexdigest()[:32]}.npz")
            if not stage.store.exists(self._path):
                stage.store.write_bytes(self._path, data)
            self._arrays = None

    @property
    def value(self) -> tuple:
        if self._arrays is None:
            self._arrays = _load_staged(self._path, self._store)
        return self._arrays

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        if self._path is not None:
            state["_arrays"] = None  # loaded on the worker, never shipped
        return state


_STAGED: dict[str, tuple] = {}


def _load_staged(path: str, store: Any) -> tuple:
    """The arrays of a staged ``.npz``, read once per Python worker process."""
    if path not in _STAGED:
        import numpy as np

        with np.load(io.BytesIO(store.read_bytes(path))) as data:
            _STAGED[path] = tuple(data[f"arr_{i}"] for i in range(len(data.files)))
    return _STAGED[path]

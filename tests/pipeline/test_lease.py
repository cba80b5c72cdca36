"""Overlapping runs: the lakehouse lease (etl/lease.py) lets one run at a time write; a second
stops with one line naming the holder, or waits; a crashed holder's lease expires."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from etl.config import PROJECT_ROOT, Config, LakehouseConf, LeaseConf
from etl.jobs.common import JobContext
from etl.lease import EXIT_BUSY, Lease, LeaseHeld, LeaseLost, check_current, hold
from etl.steps import Step, execute, pipeline_step
from etl.tables import BRONZE, LEASES, ROW_TABLES, Lakehouse


def lake_with(spark, root: Path, **lease) -> Lakehouse:
    return Lakehouse(spark, LakehouseConf(root=str(root), lease=LeaseConf(**lease)))


def test_a_second_run_is_refused_with_one_line_naming_the_holder(spark, tmp_path):
    lake = lake_with(spark, tmp_path / "lake")
    first = Lease(lake, "run-a", "score")
    first.acquire()
    try:
        with pytest.raises(LeaseHeld) as err:
            Lease(lake, "run-b", "ingest").acquire()
        line = str(err.value)
        assert "\n" not in line
        assert line.startswith(f"lakehouse {lake.root} is held by run run-a (step score, host ")
        assert f"pid {os.getpid()}, since " in line and "--wait" in line
        assert first.mine(first.holder())  # the refused run changed nothing
    finally:
        first.release()
    assert LEASES not in ROW_TABLES  # lease commits are no data commits
    held = first.holder()
    assert held.run_id == "run-a" and held.expires_at is None  # released, holder kept
    second = Lease(lake, "run-b", "ingest")
    second.acquire()  # free now
    assert second.mine(second.holder())
    second.release()


@pytest.mark.slow
def test_an_expired_lease_is_taken_over_and_the_old_holder_learns_it(spark, tmp_path):
    lake = lake_with(spark, tmp_path / "lake", expire_seconds=1, heartbeat_seconds=3600)
    crashed = Lease(lake, "run-a", "score")
    crashed.acquire()  # never renewed, never released: as a killed run leaves it
    time.sleep(1.2)
    taker = Lease(lake, "run-b", "dedup")
    assert taker.try_acquire() is None
    assert taker.holder().run_id == "run-b"
    assert not crashed.renew() and crashed.lost  # a late heartbeat does not take it back
    crashed.release()  # releases nothing: not its lease any more
    assert taker.mine(taker.holder()) and taker.holder().expires_at is not None
    taker.release()

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    killed = Lease(lake_with(spark, tmp_path / "lake"), "run-killed", "export")
    killed.pid = gone.pid  # as a run killed on this host leaves its lease: not expired...
    assert killed.try_acquire() is None and killed.holder().expires_at > time.time() + 300
    fresh = Lease(lake_with(spark, tmp_path / "lake", heartbeat_seconds=3), "run-c", "ingest")
    held = fresh.try_acquire()  # its pid is gone, but it beat just now: another container's
    assert held is not None and held.run_id == "run-killed"
    time.sleep(6.2)  # over two heartbeats (of 3 s: a loaded machine may stall) without one...
    assert fresh.try_acquire() is None  # ...and its process is gone: taken over before expiry
    assert fresh.holder().run_id == "run-c"
    fresh.release()


def test_a_run_that_lost_its_lease_stops_at_the_next_step_boundary(spark, tmp_path):
    """A step stalled past expiry (no heartbeat) is taken over by another run: it stops right
    after its action, with one line, and its after-hook (and any later step) never runs; a
    run's next pipeline step stops before its action writes anything."""
    lake = lake_with(spark, tmp_path / "lake", expire_seconds=1, heartbeat_seconds=3600)
    ctx = JobContext(Config(lakehouse=lake.conf), spark, lake, "run-a", argparse.Namespace())
    done: list[str] = []

    def stalled(_ctx: JobContext) -> dict:
        time.sleep(1.3)
        assert Lease(lake, "run-b", "dedup").try_acquire() is None  # run-b takes it over
        done.append("action")
        return {}

    step = Step("probe", "probe", "a step that stalls", stalled,
                after=lambda _c, _r: done.append("after"))
    with pytest.raises(LeaseLost) as err:
        execute(ctx, step)
    line = str(err.value)
    assert isinstance(err.value, LeaseHeld) and "\n" not in line  # exits as a refusal does
    assert line.startswith(f"lakehouse {lake.root}: this run lost its lease before step probe")
    assert "now held by run run-b (step dedup, host " in line
    assert done == ["action"]  # stopped at the boundary: the after-hook never ran
    held = Lease(lake, "probe", "probe").holder()
    assert held.run_id == "run-b" and held.expires_at is not None  # not released by run-a
    Lease(lake, "run-b", "dedup").release()

    with hold(lake, "run-c", "run") as outer:  # `dfn-curate run` holds it across its steps
        time.sleep(1.3)
        assert Lease(lake, "run-d", "score").try_acquire() is None
        with pytest.raises(LeaseLost, match="before step ingest .*now held by run run-d"):
            pipeline_step(JobContext(ctx.cfg, spark, lake, "run-c", argparse.Namespace()),
                          "ingest")
        assert outer.lost
        with pytest.raises(LeaseLost):  # the check a step makes inside (before export publishes)
            check_current(lake)
    assert not lake.exists(BRONZE)  # the ingest action never ran
    assert Lease(lake, "probe", "probe").holder().run_id == "run-d"


def test_heartbeat_pushes_expiry_on(spark, tmp_path):
    lake = lake_with(spark, tmp_path / "lake", expire_seconds=30, heartbeat_seconds=1)
    lease = Lease(lake, "run-a", "score")
    lease.acquire()
    try:
        start = beat = lease.holder()
        deadline = time.time() + 60  # the background thread renews about every second
        while beat.heartbeat_at == start.heartbeat_at and time.time() < deadline:
            time.sleep(0.5)
            beat = lease.holder()
        assert beat.heartbeat_at > start.heartbeat_at and beat.expires_at > start.expires_at
        assert beat.acquired_at == start.acquired_at
        lease.step = "score:dfn-tiny"
        assert lease.renew()
        assert lease.holder().step == "score:dfn-tiny"
    finally:
        lease.release()
    assert lease.holder().expires_at is None


def test_the_same_run_reenters_and_a_waiting_run_gets_it_after_release(spark, tmp_path,
                                                                        capsys):
    lake = lake_with(spark, tmp_path / "lake", mode="wait", wait_seconds=60)
    other = Lease(lake, "run-b", "ingest")
    got = threading.Event()
    with hold(lake, "run-a", "run") as outer:
        with hold(lake, "run-a", "score") as inner:  # nested: no second acquisition
            assert inner is outer and outer.step == "score"
        assert outer.step == "run" and outer.mine(outer.holder())

        def wait() -> None:
            other.acquire()
            got.set()

        waiter = threading.Thread(target=wait)
        waiter.start()
        time.sleep(1.0)
        assert not got.is_set()  # still waiting while run-a holds it
    waiter.join(timeout=30)
    assert got.is_set() and other.mine(other.holder())
    other.release()
    assert "[ingest] waiting for run run-a (step run, host" in capsys.readouterr().out
    with hold(lake, "r", "takedown") as none:  # exempt: a removal never waits
        assert none is None


def test_of_two_concurrent_acquirers_exactly_one_wins(spark, tmp_path):
    lake = lake_with(spark, tmp_path / "lake")
    Lease(lake, "seed", "ingest").try_acquire()  # the table exists; the row is held...
    Lease(lake, "seed", "ingest").release()  # ...and released: both MERGEs find it free
    leases = [Lease(lake, f"run-{i}", "score") for i in range(2)]
    results: list = [None, None]
    barrier = threading.Barrier(2)

    def take(i: int) -> None:
        barrier.wait()
        results[i] = leases[i].try_acquire()

    threads = [threading.Thread(target=take, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    winners = [i for i in range(2) if results[i] is None]
    assert len(winners) == 1, results
    loser = 1 - winners[0]
    assert results[loser].run_id == f"run-{winners[0]}"
    assert leases[winners[0]].holder().run_id == f"run-{winners[0]}"


@pytest.mark.slow
def test_two_cli_runs_one_refused_one_waiting(spark, tmp_path):
    """A real ``dfn-curate ingest`` holds the lakehouse (frozen with SIGSTOP); a second stops
    with the one line, a third started with --wait waits and ingests once the first ends."""
    root = tmp_path / "lake"
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("url,caption\n" + "".join(f"http://x/{i}.jpg,pair {i}\n" for i in range(6)))
    conf = tmp_path / "conf.yaml"
    conf.write_text(yaml.safe_dump({
        "spark": {"master": "local[1]", "conf": {"spark.sql.shuffle.partitions": "1",
                                                 "spark.default.parallelism": "1",
                                                 "spark.driver.memory": "1g",
                                                 "spark.ui.enabled": "false"}},
        "lakehouse": {"root": str(root), "lease": {"expire_seconds": 600}},
        "ingest": {"sources": [{"format": "csv", "path": str(pairs)}]},
    }))
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "SPARK_LOCAL_DIRS": str(tmp_path),
           "PYTHONUNBUFFERED": "1"}
    env.pop("PYSPARK_GATEWAY_PORT", None)
    env.pop("PYSPARK_GATEWAY_SECRET", None)

    def cli(*args: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "etl.cli", "ingest", "--conf", str(conf),
                                 *args], cwd=PROJECT_ROOT, env=env, start_new_session=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    lake = lake_with(spark, root)
    probe = Lease(lake, "probe", "probe")
    first = cli("--run-id", "first")
    procs = [first]
    try:
        deadline = time.time() + 300
        while first.poll() is None and time.time() < deadline:
            held = probe.holder()
            if held is not None and held.run_id == "first":
                os.killpg(first.pid, signal.SIGSTOP)  # holds the lease, does nothing
                break
            time.sleep(0.2)
        assert probe.holder().run_id == "first" and probe.holder().expires_at is not None, \
            first.communicate()[0][-3000:] if first.poll() is not None else "never held"
        second, third = cli("--run-id", "second"), cli("--run-id", "third", "--wait")
        procs += [second, third]
        out, _ = second.communicate(timeout=300)
        refusals = [ln for ln in out.splitlines() if "is held by run first" in ln]
        assert second.returncode == EXIT_BUSY, out[-3000:]
        assert len(refusals) == 1 and "Traceback" not in out, out[-3000:]
        assert refusals[0].startswith(f"error: lakehouse {root} is held by run first (step "
                                      "ingest, host ")
        lines = []
        for line in third.stdout:  # --wait: says it waits, then waits
            lines.append(line)
            if "[ingest] waiting for run first" in line:
                break
        assert third.poll() is None, "".join(lines)[-3000:]
        os.killpg(first.pid, signal.SIGCONT)
        assert first.wait(timeout=300) == 0
        rest, _ = third.communicate(timeout=300)
        assert third.returncode == 0, ("".join(lines) + rest)[-3000:]
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGCONT)
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    bronze = lake.read(BRONZE)
    assert bronze.count() == 6 and bronze.select("uid").distinct().count() == 6
    assert probe.holder().run_id == "third" and probe.holder().expires_at is None

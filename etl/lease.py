"""One run at a time on a lakehouse: the lease a run holds while a step that writes runs.

The lease is one row of the Delta table ``run_leases`` (:data:`etl.tables.LEASES`, key
``lakehouse``): who holds it (run id, step, host, pid), since when, its last heartbeat, and
when it expires (null: released). A run takes it with one ``UPDATE`` of that row whose
condition holds only when it is released, expired or already this holder's, then reads the row
back: Delta's optimistic concurrency lets exactly one of two concurrent updates of the row
commit (the other fails with a concurrent-modification error, read as "lost": the row is read
again). The first run creates the table with its row in one commit. Nothing but
SQL on a Delta table is used, so it works on local folders, on object stores (given a Delta log
store that commits atomically, as any concurrent Delta writer needs) and over Spark Connect.

While a step runs, a daemon thread renews ``expires_at`` every ``heartbeat_seconds``; the step
releases the lease when it ends, failed or not. A holder that crashed stops renewing, so its
lease expires after ``expire_seconds`` and the next run takes it over; one on the same host
whose process is gone (killed) and whose heartbeat is over two beats old is taken over at once
(a fresh heartbeat wins over a pid check: containers may share a host name but not their
process ids). A holder that lost its lease (it stopped renewing long enough for another run to
take it over) stops at the next step boundary with one line (:class:`LeaseLost`, checked by
:func:`check_held` before and after each step's action) instead of writing on.

A second run either stops at once with one line naming the holder (:class:`LeaseHeld`,
``lakehouse.lease.mode: fail``, the default) or polls until the lease is free (``wait``, or
``--wait``), saying so about every 30 s, for up to ``wait_seconds``. Within one process a run
re-enters its own lease (``dfn-curate run`` holds it once across its steps).

Not leased (:data:`UNLEASED`): ``takedown`` (a removal must never wait behind a long run; a
step that ran meanwhile re-applies it when it ends: :func:`etl.takedown.apply.reconcile`),
``train-dfn`` and ``report`` (they only read tables, snapshot-isolated by Delta, and write
files outside them) and ``sample`` (no Spark).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone

from etl.config import LeaseConf
from etl.redact import redact_text
from etl.sqltext import sql_string
from etl.tables import LEASES, Lakehouse, _missing

KEY = "lakehouse"  # the one lease row's key
UNLEASED = frozenset({"takedown", "train-dfn", "report", "sample"})
POLL_SECONDS = 5.0  # how often a waiting run reads the lease
SAY_SECONDS = 30.0  # how often a waiting run says it still waits
EXIT_BUSY = 75  # the exit status of a command refused by a held lease (EX_TEMPFAIL)
_CONFLICTS = ("Concurrent", "DELTA_CONCURRENT", "ProtocolChanged", "MetadataChanged",
              "already exists", "ALREADY_EXISTS")
# the lease table keeps a week of commits (one per heartbeat) in its log, not 30 days
_PROPERTIES = "'delta.logRetentionDuration' = 'interval 7 days'"
_COLUMNS = ("run_id", "step", "host", "pid", "acquired_at", "heartbeat_at", "expires_at")


@dataclass(frozen=True)
class Holder:
    """The lease row: who holds it and until when (epoch seconds; ``expires_at`` None:
    released)."""

    run_id: str | None
    step: str | None
    host: str | None
    pid: int | None
    acquired_at: float | None
    heartbeat_at: float | None
    expires_at: float | None

    def active(self, now: float) -> bool:
        """Whether the lease is held at ``now`` (not released, not expired)."""
        return self.run_id is not None and self.expires_at is not None and self.expires_at >= now

    def describe(self) -> str:
        """``run R (step S, host H, pid P, since T, expires T2)``."""
        return (f"run {self.run_id} (step {self.step}, host {self.host}, pid {self.pid}, since "
                f"{_utc(self.acquired_at)}, expires {_utc(self.expires_at)} unless renewed)")


class LeaseHeld(RuntimeError):
    """Another run holds the lakehouse: the one line to stop with."""

    def __init__(self, where: str, holder: Holder, waited: float | None = None):
        self.holder = holder
        tail = (f"; still held after waiting {waited:.0f}s (lakehouse.lease.wait_seconds)"
                if waited is not None else "; wait for it to end, or pass --wait "
                "(lakehouse.lease.mode=wait)")
        super().__init__(redact_text(f"lakehouse {where} is held by {holder.describe()}{tail}"))


class LeaseLost(LeaseHeld):
    """This run's lease expired and another run took the lakehouse over: the one line to stop
    with (a :class:`LeaseHeld`, so the command exits as a refused one does)."""

    def __init__(self, where: str, step: str, holder: Holder | None):
        self.holder = holder  # type: ignore[assignment]
        now = f"now held by {holder.describe()}" if holder is not None and holder.run_id \
            else "no longer held by this run"
        RuntimeError.__init__(self, redact_text(
            f"lakehouse {where}: this run lost its lease before step {step} could go on ({now}); "
            "it stopped without writing more: raise lakehouse.lease.expire_seconds and re-run"))


class Lease:
    """The lease of ``lake`` as run ``run_id`` running ``step`` would hold it."""

    def __init__(self, lake: Lakehouse, run_id: str, step: str, conf: LeaseConf | None = None):
        self.lake, self.run_id, self.step = lake, run_id, step
        self.conf = conf or lake.conf.lease
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.lost = False
        self._confirmed = float("-inf")  # monotonic time before the last write that held it
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    @property
    def where(self) -> str:
        """The lakehouse, as the refusal names it."""
        conf = self.lake.conf
        if conf.schema:
            return ".".join(p for p in (conf.catalog, conf.schema) if p)
        return self.lake.root

    def holder(self) -> Holder | None:
        """The lease row as stored now (all None: no row; None: no lease table yet)."""
        cols = ", ".join(f"CAST({c} AS DOUBLE)" if c.endswith("_at") else c for c in _COLUMNS)
        try:
            row = self.lake.spark.sql(f"SELECT {cols} FROM {self.lake.name(LEASES)} WHERE "
                                      f"lease = {sql_string(KEY)} LIMIT 1").first()
        except Exception as exc:  # noqa: BLE001 - "not a Delta table" / "path does not exist"
            if _missing(exc):
                return None
            raise
        return Holder(*(row or [None] * len(_COLUMNS)))

    def mine(self, holder: Holder | None) -> bool:
        """Whether ``holder`` is this lease (same run, host and process)."""
        return holder is not None and (holder.run_id, holder.host, holder.pid) == \
            (self.run_id, self.host, self.pid)

    def gone(self, holder: Holder) -> bool:
        """Whether ``holder`` ran on this host in a process that no longer exists (killed) and
        has not renewed for over two heartbeats: its lease is free at once instead of after
        expiry. A fresh heartbeat is trusted over the pid check (another container with the
        same host name has its own process ids)."""
        if holder.host != self.host or holder.pid is None or holder.pid == self.pid:
            return False
        beat = holder.heartbeat_at
        if beat is not None and time.time() - beat <= 2 * self.conf.heartbeat_seconds:
            return False
        try:
            os.kill(holder.pid, 0)
        except ProcessLookupError:
            return True
        except OSError:  # alive, another user's
            return False
        return False

    def try_acquire(self) -> Holder | None:
        """Take the lease if it is free, expired or already ours: None when held now, else the
        run that holds it."""
        try:  # the usual case, a released lease: one conditional UPDATE, no read
            if self._write(acquire=True):
                return None
        except Exception as exc:  # noqa: BLE001 - no table yet, or a race: read the row
            if not (_missing(exc) or any(m in str(exc) for m in _CONFLICTS)):
                raise
        for _ in range(5):  # each try that loses a commit race reads the row again
            held = self.holder()
            dead = held if held is not None and self.gone(held) else None
            if held is not None and held.active(time.time()) and not self.mine(held) \
                    and dead is None:
                return held
            try:
                won = self._write(acquire=True, create=held is None, dead=dead,
                                  insert=held is not None and held.run_id is None)
            except Exception as exc:  # noqa: BLE001 - a concurrent commit: read who won
                if not any(m in str(exc) for m in _CONFLICTS):
                    raise
                continue
            if won or self.mine(self.holder()):
                return None
        raise RuntimeError(f"lease of {self.where}: lost five commit races in a row")

    def acquire(self) -> None:
        """Take the lease, or raise :class:`LeaseHeld` (``mode: fail``), or wait for it
        (``mode: wait``, up to ``wait_seconds``); then renew it in the background."""
        start, said = time.monotonic(), None
        tried, held = time.monotonic(), self.try_acquire()
        while held is not None:
            waited = time.monotonic() - start
            if self.conf.mode != "wait":
                raise LeaseHeld(self.where, held)
            if waited >= self.conf.wait_seconds:
                raise LeaseHeld(self.where, held, waited)
            if said is None or time.monotonic() - said >= SAY_SECONDS:
                said = time.monotonic()
                print(f"[{self.step}] waiting for {held.describe()} to release lakehouse "
                      f"{redact_text(self.where)} ({waited:.0f}s of "
                      f"{self.conf.wait_seconds}s)", flush=True)
            time.sleep(min(POLL_SECONDS, max(0.1, self.conf.wait_seconds - waited)))
            tried, held = time.monotonic(), self.try_acquire()
        self._confirmed = tried
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, daemon=True,
                                      name=f"lease-{self.run_id}")
        self._beat.start()

    def renew(self) -> bool:
        """Push ``expires_at`` on (and record the current step); False once the lease is lost
        (it expired and another run took it)."""
        with self._lock:
            if self.lost:
                return False
            tried = time.monotonic()
            try:
                renewed = self._write(acquire=False)
            except Exception as exc:  # noqa: BLE001 - a lost race: the row says who holds it
                if not any(m in str(exc) for m in _CONFLICTS):
                    raise
                renewed = False
            if renewed:
                self._confirmed = tried
            elif not self.mine(self.holder()):
                self.lost = True
                print(f"[{self.step}] lost the lease of lakehouse {redact_text(self.where)} "
                      "(it expired: raise lakehouse.lease.expire_seconds)", flush=True)
        return not self.lost

    def check(self) -> None:
        """Raise :class:`LeaseLost` when the lease is no longer this run's (the heartbeat found
        it lost, or the row names another holder or none now): one read of the lease row, none
        within half the expiry of the last write that held it (no other run may take it before
        it expires, and this process, alive, is not taken for a killed one)."""
        if not self.lost and time.monotonic() - self._confirmed < self.conf.expire_seconds / 2:
            return
        if not self.lost:
            held = self.holder()
            if self.mine(held):  # still ours (late renewals alone lose nothing)
                return
            with self._lock:
                self.lost = True
        else:
            held = self.holder()
        raise LeaseLost(self.where, self.step, held)

    def release(self) -> None:
        """Stop renewing and free the lease (when it is still ours)."""
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=60)
        with self._lock:
            if self.lost:
                return
            now = time.time()
            self.lake.spark.sql(
                f"UPDATE {self.lake.name(LEASES)} SET expires_at = NULL, heartbeat_at = "
                f"{_ts(now)} WHERE lease = {sql_string(KEY)} AND "
                f"{self._is_me()}")

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.conf.heartbeat_seconds):
            try:
                if not self.renew():
                    return
            except Exception as exc:  # noqa: BLE001 - a failed renewal is retried next beat
                print(f"[{self.step}] lease renewal failed: {redact_text(str(exc))[:200]}",
                      flush=True)

    def _is_me(self, who: Holder | None = None) -> str:
        run_id, host, pid = (self.run_id, self.host, self.pid) if who is None else \
            (who.run_id, who.host, who.pid)
        return f"run_id = {sql_string(run_id)} AND host = {sql_string(host)} AND pid = {pid}"

    def _write(self, acquire: bool, create: bool = False, insert: bool = False,
               dead: Holder | None = None) -> bool:
        """Take the lease row (``acquire``: when released, expired, ours or still ``dead``'s)
        or renew it (only when ours): one conditional UPDATE. ``create``: make the table with
        the row instead; ``insert``: the row is missing, MERGE it in."""
        now = time.time()
        values = {"run_id": sql_string(self.run_id), "step": sql_string(self.step),
                  "host": sql_string(self.host), "pid": f"CAST({self.pid} AS BIGINT)",
                  "acquired_at": _ts(now), "heartbeat_at": _ts(now),
                  "expires_at": _ts(now + self.conf.expire_seconds)}
        name = self.lake.name(LEASES)
        row = f"SELECT {sql_string(KEY)} AS lease, " + ", ".join(
            f"{v} AS {k}" for k, v in values.items())
        if create:  # two creators: one commits version 0, the other fails or finds it made
            self.lake.ensure_schema()
            self.lake.spark.sql(f"CREATE TABLE IF NOT EXISTS {name} USING delta TBLPROPERTIES "
                                f"({_PROPERTIES}) AS {row}")
        elif insert:  # a MERGE (not a blind append): two concurrent ones conflict
            self.lake.spark.sql(f"MERGE INTO {name} t USING ({row}) s ON t.lease = s.lease "
                                "WHEN NOT MATCHED THEN INSERT *")
        else:
            if not acquire:
                values.pop("acquired_at")
            whose = f"({self._is_me()})"
            if acquire:
                gone = f" OR ({self._is_me(dead)})" if dead is not None else ""
                whose = f"(expires_at IS NULL OR expires_at < {_ts(now)} OR {whose}{gone})"
            done = self.lake.spark.sql(
                f"UPDATE {name} SET " + ", ".join(f"{k} = {v}" for k, v in values.items())
                + f" WHERE lease = {sql_string(KEY)} AND {whose}").first()
            return bool(done and done[0])  # num_affected_rows: the row matched, committed
        return False


_HELD: dict[str, Lease] = {}  # lease table -> the lease this process holds on it
_GUARD = threading.Lock()


@contextmanager
def hold(lake: Lakehouse, run_id: str, step: str) -> Iterator[Lease | None]:
    """Hold the lease of ``lake`` as ``run_id`` while ``step`` runs (None for an unleased
    step). Re-entrant: a run that holds it already only records ``step`` as its current one
    (written with the next renewal)."""
    if step in UNLEASED:
        yield None
        return
    key = lake.name(LEASES)
    with _GUARD:
        outer = _HELD.get(key)
    if outer is not None and outer.run_id == run_id:
        before, outer.step = outer.step, step
        try:
            yield outer
        finally:
            outer.step = before
        return
    lease = Lease(lake, run_id, step)
    lease.acquire()
    with _GUARD:
        _HELD[key] = lease
    try:
        yield lease
    finally:
        with _GUARD:
            if _HELD.get(key) is lease:
                del _HELD[key]
        try:
            lease.release()
        except Exception as exc:  # noqa: BLE001 - the step's own error matters more
            print(f"[{step}] could not release the lease (it expires by itself): "
                  f"{redact_text(str(exc))[:200]}", flush=True)


def check_held(lease: Lease | None) -> None:
    """Stop (:class:`LeaseLost`) when ``lease`` (None: an unleased step) was lost: called at
    step boundaries, so a run whose lease another took over writes nothing more."""
    if lease is not None:
        lease.check()


def holds(lake: Lakehouse) -> bool:
    """Whether this process holds the lease of ``lake`` and it is still its own
    (:class:`LeaseLost` when it was lost): no other run writes to the lakehouse meanwhile."""
    with _GUARD:
        lease = _HELD.get(lake.name(LEASES))
    check_held(lease)
    return lease is not None


def check_current(lake: Lakehouse) -> None:
    """:func:`check_held` on the lease this process holds on ``lake`` (none held: nothing to
    check), for a boundary inside a step (e.g. before export publishes its manifest)."""
    holds(lake)


def _ts(seconds: float) -> str:
    """A SQL timestamp literal of epoch ``seconds`` (whole microseconds)."""
    return f"timestamp_micros({int(seconds * 1_000_000)})"


def _utc(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")

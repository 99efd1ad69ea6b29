"""Leased locks in the artifact store, safe across machines: several workers never compute one artifact twice.

A lock is one small JSON object `{root}/_locks/{name}.lock` = {holder, token, host, pid, ...}. Every
write of it has a **version** the store itself assigns or checks, and every change after the first is
conditional on the version the writer last saw (a fencing token):

- GCS: the object's generation. Create = upload with `ifGenerationMatch=0`; renew = upload with
  `ifGenerationMatch=<generation I wrote last>`; release and break = delete with `ifGenerationMatch=<the
  generation seen>`. A 412 means someone else changed the lock: the operation did nothing. The JSON API
  is called through gcsfs's own `call` (same credentials, endpoint and retries as the store).
- Local disk: a random `token` in the content. Create = hard link of a written temporary file (fails if
  the name exists); renew, release and break compare the token and then `os.replace`/unlink under an
  exclusive `flock` of `{folder}/.guard` (every process on the host, and NFS clients, honour it).
- memory:// (one process): the same token check under a process-wide lock.

**Expiry without comparing machine clocks.** A lock expires when its version has not changed for longer
than the lease. A waiter measures that on its own monotonic clock from the moment it first sees a version,
plus the version's age when first seen, measured entirely on the store's clock: the lock object's
`updated` time against that of a probe object the waiter writes then (so a lock left behind hours ago is
broken at once). The `expires_at` in the record is written by the holder's clock and is informational
only. A live holder renews from a background thread every lease/4 (default lease 120 s,
`LLM_TRM_LOCK_LEASE_SECONDS`); a holder that dies (SIGKILL, preempted VM) stops renewing and its lock
expires after the lease.

**Breaking** an expired lock, or one whose holder is known dead, is a conditional delete of the version
seen: of several waiters exactly one succeeds, and a lock re-taken meanwhile is never deleted. A holder is
known dead when its process is gone from this same host (host, pid and process start time are in the
record), or when the `is_dead` hook says so (tasks/caching.py asks Prefect whether the holder's flow run
has ended, or was an earlier attempt of the waiter's own run). A holder whose process is alive on this host
is never broken, whatever the hook says.

**A holder that lost its lock** (stalled past its lease, lock broken and taken by another worker) finds out
at its next renewal: the conditional write fails, it stops renewing, logs an error naming the new holder,
and `still_held` answers False from then on (the Prefect lock manager's `is_lock_holder` is `still_held`,
so Prefect refuses to write that task's cache record, and `release` raises).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fsspec import AbstractFileSystem

from llm_trm_core.errors import UserError

logger = logging.getLogger(__name__)

LOCKS_DIR = "_locks"
LEASE_ENV = "LLM_TRM_LOCK_LEASE_SECONDS"
WAIT_ENV = "LLM_TRM_LOCK_WAIT_SECONDS"
POLL_SECONDS = 0.2
_MEMORY_GUARD = threading.RLock()


class LockWaitTimeoutError(UserError):
    """A waiter gave up on a lock that a live holder kept renewing for longer than the wait bound."""


def lease_seconds() -> float:
    return float(os.environ.get(LEASE_ENV, "120"))


def wait_seconds() -> float:
    """How long a stage waits for a lock held by a live holder before failing (default 6 h)."""
    return float(os.environ.get(WAIT_ENV, str(6 * 3600)))


@functools.cache
def host_id() -> str:
    """This machine and PID namespace: process ids are comparable only between equal host ids."""
    parts = [socket.gethostname()]
    for path in ("/proc/sys/kernel/random/boot_id", "/proc/self/ns/pid"):
        with contextlib.suppress(OSError):
            parts.append(os.readlink(path) if path.endswith("/pid") else Path(path).read_text().strip())
    return "|".join(parts)


def process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart; None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None if not _pid_exists(pid) else ""
    return stat.rsplit(")", 1)[1].split()[19]


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def holder_process_gone(record: dict[str, Any]) -> bool:
    """True when the lock's holder process ran on this host and no longer exists (or its pid was reused)."""
    if record.get("host") != host_id() or not isinstance(record.get("pid"), int):
        return False
    started = process_start(int(record["pid"]))
    return started is None or (bool(started) and bool(record.get("pid_start")) and started != record["pid_start"])


def describe_holder(record: dict[str, Any] | None) -> str:
    """'X (flow run R, host H, pid P)' from a lock record."""
    if not record:
        return "nobody"
    where = []
    if record.get("flow_run_id"):
        where.append(f"flow run {record['flow_run_id']}")
    if record.get("host"):
        where.append(f"host {str(record['host']).split('|')[0]}")
    if record.get("pid"):
        where.append(f"pid {record['pid']}")
    return f"{record.get('holder')}" + (f" ({', '.join(where)})" if where else "")


@dataclass(frozen=True)
class _Observed:
    record: dict[str, Any]
    token: str  # the version: GCS generation, or the content's token elsewhere
    updated: float | None  # when the store last wrote it, on the store's clock (epoch seconds)


@dataclass(frozen=True)
class _Seen:
    token: str
    first: float  # waiter's monotonic clock when this version was first seen
    age: float  # the version's age then, on the store's clock


@dataclass(frozen=True)
class _Held:
    holder: str
    identity: dict[str, Any]
    token: str


class StoreLocks:
    """Named leased locks under one folder of a filesystem (thread-safe)."""

    def __init__(
        self,
        fs: AbstractFileSystem,
        folder: str,
        lease: float | None = None,
        owner: Callable[[], dict[str, Any]] | None = None,
        is_dead: Callable[[dict[str, Any]], bool] | None = None,
    ) -> None:
        self.fs, self.folder = fs, folder.rstrip("/")
        self.lease = lease if lease is not None else lease_seconds()
        self.owner, self.is_dead = owner, is_dead
        self._announced: set[tuple[str, str]] = set()
        self._held: dict[str, _Held] = {}
        self._lost: dict[str, dict[str, Any] | None] = {}  # name -> the record that replaced ours
        self._seen: dict[str, _Seen] = {}
        self._guard = threading.Lock()  # the maps above
        self._ops = threading.Lock()  # a renewal and a release of this instance's locks never interleave
        self._renewer: threading.Thread | None = None
        self._wall: Callable[[], float] = time.time  # only for the informational expires_at
        protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
        self._kind = (
            "local" if protocols & {"file", "local"}
            else "gcs" if protocols & {"gs", "gcs"}
            else "memory"
        )  # fmt: skip

    # ---- paths and records ------------------------------------------------------------------------

    def _path(self, name: str) -> str:
        return f"{self.folder}/{name}.lock"

    def _localpath(self, path: str) -> str:
        return str(self.fs._strip_protocol(path))

    def _gcs_split(self, path: str) -> tuple[str, str]:
        bucket, key, _ = self.fs.split_path(path)
        return str(bucket), str(key)

    @staticmethod
    def _parse(data: bytes) -> dict[str, Any] | None:
        try:
            record = json.loads(data)
        except ValueError:
            return None
        return dict(record) if isinstance(record, dict) else None

    def _payload(self, holder: str, identity: dict[str, Any]) -> tuple[str, bytes]:
        token = uuid.uuid4().hex
        record = {"holder": holder, "token": token, "expires_at": self._wall() + self.lease, **identity}
        return token, json.dumps(record).encode()

    def _identity(self) -> dict[str, Any]:
        """Where this holder runs (kept for the lock's lifetime: renewals run in another thread)."""
        pid = os.getpid()
        return {
            "host": host_id(),
            "pid": pid,
            "pid_start": process_start(pid) or "",
            **(self.owner() if self.owner else {}),
        }

    # ---- backend primitives: observe, create, swap, delete, store clock ------------------------------

    def _observe(self, name: str) -> _Observed | None:
        """The lock's record, version and store-side write time; None if there is no lock."""
        path = self._path(name)
        if self._kind == "gcs":
            bucket, key = self._gcs_split(path)
            for _ in range(5):
                try:
                    meta = self.fs.call("GET", "b/{}/o/{}", bucket, key, json_out=True)
                    _, data = self.fs.call("GET", "b/{}/o/{}", bucket, key, alt="media", generation=meta["generation"])
                except FileNotFoundError:
                    continue  # gone, or replaced between the two reads: look again
                updated = self.fs._parse_timestamp(meta["updated"]).timestamp()
                return _Observed(self._parse(data) or {"holder": "?"}, str(meta["generation"]), updated)
            return None
        if self._kind == "local":
            try:
                with open(self._localpath(path), "rb") as f:
                    data, st = f.read(), os.fstat(f.fileno())
            except FileNotFoundError:
                return None
            record = self._parse(data) or {"holder": "?"}
            return _Observed(record, str(record.get("token") or f"stat:{st.st_ino}:{st.st_mtime_ns}"), st.st_mtime)
        with _MEMORY_GUARD:
            try:
                data = self.fs.cat_file(path)
                updated = self.fs.modified(path).timestamp()
            except FileNotFoundError:
                return None
        record = self._parse(data) or {"holder": "?"}
        return _Observed(record, str(record.get("token") or f"time:{updated}"), updated)

    @contextlib.contextmanager
    def _local_guard(self) -> Iterator[None]:
        """Exclusive across processes (and threads: each call opens its own file description)."""
        local = self._localpath(self.folder)
        os.makedirs(local, exist_ok=True)
        fd = os.open(f"{local}/.guard", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _tmp(self, path: str, data: bytes) -> str:
        tmp = f"{self._localpath(path)}.tmp-{os.getpid()}-{threading.get_ident()}-{uuid.uuid4().hex[:6]}"
        with open(tmp, "wb") as f:
            f.write(data)
        return tmp

    def _gcs_upload(self, path: str, data: bytes, if_generation: str) -> dict[str, Any]:
        """Upload `data` if the object's generation is `if_generation` ('0': absent); FileExistsError if not."""
        bucket, key = self._gcs_split(path)
        meta = self.fs.call(
            "POST",
            f"{self.fs._location}/upload/storage/v1/b/{quote(bucket, safe='')}/o",
            uploadType="media",
            name=key,
            ifGenerationMatch=if_generation,
            data=data,
            headers={"Content-Type": "application/octet-stream"},
            json_out=True,
        )
        self.fs.invalidate_cache(path)
        return dict(meta)

    def _create(self, name: str, token: str, data: bytes) -> str | None:
        """Create the lock holding `data`, atomically; its version, or None if a lock exists."""
        path = self._path(name)
        if self._kind == "gcs":
            try:
                return str(self._gcs_upload(path, data, "0")["generation"])
            except FileExistsError:  # taken; or our own first attempt succeeded and gcsfs retried it
                seen = self._observe(name)
                return seen.token if seen is not None and seen.record.get("token") == token else None
        if self._kind == "local":
            self.fs.makedirs(self.folder, exist_ok=True)
            tmp = self._tmp(path, data)
            try:
                os.link(tmp, self._localpath(path))  # atomic: fails with FileExistsError when the name is taken
            except FileExistsError:
                return None
            finally:
                os.unlink(tmp)
            return token
        with _MEMORY_GUARD:
            if self.fs.exists(path):
                return None
            self.fs.pipe_file(path, data)
        return token

    def _swap(self, name: str, expected: str, token: str, data: bytes) -> str | None:
        """Replace the lock with `data` if its version is still `expected`; the new version, or None."""
        path = self._path(name)
        if self._kind == "gcs":
            try:
                return str(self._gcs_upload(path, data, expected)["generation"])
            except FileExistsError:  # 412: changed (or our own retried write landed: check)
                seen = self._observe(name)
                return seen.token if seen is not None and seen.record.get("token") == token else None
        if self._kind == "local":
            with self._local_guard():
                seen = self._observe(name)
                if seen is None or seen.token != expected:
                    return None
                os.replace(self._tmp(path, data), self._localpath(path))
            return token
        with _MEMORY_GUARD:
            seen = self._observe(name)
            if seen is None or seen.token != expected:
                return None
            self.fs.pipe_file(path, data)
        return token

    def _delete(self, name: str, expected: str) -> bool:
        """Delete the lock if its version is still `expected`; False if it changed (True if already gone)."""
        path = self._path(name)
        if self._kind == "gcs":
            bucket, key = self._gcs_split(path)
            try:
                self.fs.call("DELETE", "b/{}/o/{}", bucket, key, ifGenerationMatch=expected)
            except FileExistsError:
                return False
            except FileNotFoundError:
                pass
            finally:
                self.fs.invalidate_cache(path)
            return True
        guard = self._local_guard() if self._kind == "local" else _MEMORY_GUARD
        with guard:
            seen = self._observe(name)
            if seen is None:
                return True
            if seen.token != expected:
                return False
            self.fs.rm_file(path)
        return True

    def _store_now(self) -> float | None:
        """The store's current time: the write time of a probe object written now (None if unknown)."""
        probe = f"{self.folder}/.clock-{uuid.uuid4().hex}"
        try:
            if self._kind == "gcs":
                meta = self._gcs_upload(probe, b"clock", "0")
                with contextlib.suppress(OSError):
                    self.fs.rm_file(probe)
                return float(self.fs._parse_timestamp(meta["updated"]).timestamp())
            if self._kind == "local":
                os.makedirs(self._localpath(self.folder), exist_ok=True)
                tmp = self._tmp(probe, b"")
                try:
                    return os.stat(tmp).st_mtime
                finally:
                    os.unlink(tmp)
            self.fs.pipe_file(probe, b"")
            try:
                return float(self.fs.modified(probe).timestamp())
            finally:
                self.fs.rm_file(probe)
        except OSError as exc:
            logger.debug("could not read the store's clock: %s", exc)
            return None

    # ---- judgement -----------------------------------------------------------------------------------

    def _expired(self, name: str, seen: _Observed) -> bool:
        """Unchanged for longer than the lease: store-clock age when first seen + waiter's monotonic time since."""
        now = time.monotonic()
        with self._guard:
            last = self._seen.get(name)
        if last is None or last.token != seen.token:
            age = 0.0
            store_now = self._store_now() if seen.updated is not None else None
            if store_now is not None and seen.updated is not None:
                age = max(0.0, store_now - seen.updated)
            last = _Seen(seen.token, now, age)
            with self._guard:
                self._seen[name] = last
        return last.age + (now - last.first) >= self.lease

    def _dead_reason(self, record: dict[str, Any]) -> str | None:
        """Why the holder of a live lease is known to be dead, or None (alive, or not known)."""
        if record.get("host") == host_id() and isinstance(record.get("pid"), int):
            return f"its process {record['pid']} is gone from this host" if holder_process_gone(record) else None
        try:
            return "its flow run has ended" if self.is_dead is not None and self.is_dead(record) else None
        except Exception as exc:  # the orchestrator is unreachable: fall back to the lease
            logger.debug("could not tell whether lock holder %s is alive: %s", record.get("holder"), exc)
            return None

    def _announce_wait(self, name: str, record: dict[str, Any]) -> None:
        key = (name, str(record.get("holder")))
        if key not in self._announced:
            self._announced.add(key)
            logger.info(
                "waiting for lock %s, held by a live holder %s; it is broken if not renewed for %.0f s",
                name, describe_holder(record), self.lease,
            )  # fmt: skip

    # ---- the lock protocol ---------------------------------------------------------------------------

    def try_acquire(self, name: str, holder: str) -> bool:
        current = self._observe(name)
        if current is not None:
            if current.record.get("holder") == holder:
                return True  # re-entrant
            expired = self._expired(name, current)
            reason = None if expired else self._dead_reason(current.record)
            if reason is None and not expired:
                self._announce_wait(name, current.record)
                return False
            if not self._delete(name, current.token):
                return False  # another waiter broke it first, or the holder renewed just now
            logger.warning(
                "lock %s held by %s %s; broke it", name, describe_holder(current.record),
                reason or f"expired (not renewed for {self.lease:.0f} s)",
            )  # fmt: skip
        identity = self._identity()
        token, data = self._payload(holder, identity)
        version = self._create(name, token, data)
        if version is None:
            return False
        with self._guard:
            self._held[name] = _Held(holder, identity, version)
            self._lost.pop(name, None)
            self._start_renewer()
        return True

    def acquire(self, name: str, holder: str, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.try_acquire(name, holder):
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(POLL_SECONDS)
        return True

    def release(self, name: str, holder: str) -> None:
        with self._ops:
            with self._guard:
                mine = self._held.get(name)
                lost = name in self._lost
            if mine is not None and mine.holder == holder:
                token = mine.token
            else:
                current = self._observe(name)
                if current is None or current.record.get("holder") != holder:
                    why = f"; it was lost to {describe_holder(self._lost.get(name))}" if lost else ""
                    raise ValueError(f"lock {name} is not held by {holder}{why}")
                token = current.token
            with self._guard:
                self._held.pop(name, None)
            if not self._delete(name, token):
                current = self._observe(name)
                with self._guard:
                    self._lost[name] = current.record if current else None
                raise ValueError(
                    f"lock {name} is not held by {holder}: it was lost to "
                    f"{describe_holder(current.record if current else None)}"
                )

    def holder(self, name: str) -> str | None:
        """The holder of a live (not expired) lock, or None."""
        current = self._observe(name)
        if current is None or self._expired(name, current):
            return None
        return str(current.record.get("holder"))

    def record(self, name: str) -> dict[str, Any] | None:
        current = self._observe(name)
        return current.record if current is not None else None

    def still_held(self, name: str, holder: str) -> bool:
        """Whether `holder` holds the lock now, as the store says (this instance's version must match)."""
        current = self._observe(name)
        if current is None or current.record.get("holder") != holder:
            return False
        with self._guard:
            mine = self._held.get(name)
            lost = name in self._lost
        if mine is not None:
            return mine.token == current.token
        return not lost

    def wait(self, name: str, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.holder(name) is not None:
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(POLL_SECONDS)
        return True

    def _start_renewer(self) -> None:
        if self._renewer is None or not self._renewer.is_alive():
            self._renewer = threading.Thread(target=self._renew_forever, name="llm-trm-lock-lease", daemon=True)
            self._renewer.start()

    def _renew_forever(self) -> None:
        while True:
            time.sleep(max(self.lease / 4, POLL_SECONDS / 4))
            self.renew()

    def renew(self) -> None:
        """Renew every lock this instance holds, each conditional on the version it wrote last."""
        with self._guard:
            names = list(self._held)
        for name in names:
            with self._ops:
                with self._guard:
                    mine = self._held.get(name)
                if mine is None:
                    continue  # released meanwhile
                token, data = self._payload(mine.holder, mine.identity)
                try:
                    version = self._swap(name, mine.token, token, data)
                except OSError as exc:  # storage hiccup: try again next round, the lease has slack
                    logger.warning("could not renew lock %s: %s", name, exc)
                    continue
                if version is not None:
                    with self._guard:
                        self._held[name] = _Held(mine.holder, mine.identity, version)
                    continue
                current = self.record(name)
                with self._guard:
                    self._held.pop(name, None)
                    self._lost[name] = current
                logger.error(
                    "lock %s was lost by %s: it was not renewed within its %.0f s lease and is now held by %s; "
                    "this holder's work on it will not be recorded",
                    name, mine.holder, self.lease, describe_holder(current),
                )  # fmt: skip

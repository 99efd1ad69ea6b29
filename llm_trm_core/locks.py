"""Leased locks in the artifact store, so several workers never compute the same artifact twice.

A lock is one small JSON file `{root}/_locks/{name}.lock` = {holder, expires_at}, created atomically
with its content: a hard link from a written temporary file on a local disk (fails if the name
exists), `ifGenerationMatch=0` on GCS (gcsfs `mode="create"`), a check-and-set under a process lock
in memory://. Renewals replace the whole file atomically (rename locally; object writes on GCS).
The holder renews its lease from a background thread while it holds the lock; a holder that dies
(SIGKILL, preempted VM) stops renewing, and its lock expires after the lease (default 120 s,
`LLM_TRM_LOCK_LEASE_SECONDS`), so a retried run is never blocked for good. A holder that is stuck
but alive keeps its lock (its thread still renews).

A holder known to be dead does not make anyone wait for its lease: each lock records where it is held
(host, process id and that process's start time) plus what the orchestration layer adds (`owner`, e.g.
the flow run and its attempt). A waiter breaks the lock at once when the holder's process is gone from
this same host, or when the `is_dead` hook says so (tasks/caching.py asks Prefect whether the holder's
flow run has ended, or was an earlier attempt of the waiter's own run). A holder whose process is alive
on this host is never broken, whatever the hook says.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fsspec import AbstractFileSystem

logger = logging.getLogger(__name__)

LOCKS_DIR = "_locks"
LEASE_ENV = "LLM_TRM_LOCK_LEASE_SECONDS"
POLL_SECONDS = 0.2
_MEMORY_CREATE = threading.Lock()


def lease_seconds() -> float:
    return float(os.environ.get(LEASE_ENV, "120"))


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
        self._held: dict[str, tuple[str, dict[str, Any]]] = {}  # name -> (holder, identity)
        self._guard = threading.Lock()
        self._renewer: threading.Thread | None = None

    def _path(self, name: str) -> str:
        return f"{self.folder}/{name}.lock"

    def _read(self, name: str) -> dict[str, object] | None:
        try:
            return dict(json.loads(self.fs.cat_file(self._path(name))))
        except FileNotFoundError:
            return None
        except ValueError:  # unreadable (a holder died mid-write): expires a lease after its last change
            modified = self.fs.modified(self._path(name)).timestamp()
            return {"holder": "?", "expires_at": modified + self.lease}

    @property
    def _local(self) -> bool:
        protocols = {self.fs.protocol} if isinstance(self.fs.protocol, str) else set(self.fs.protocol)
        return bool(protocols & {"file", "local"})

    def _written_tmp(self, path: str, data: bytes) -> tuple[str, str]:
        """(local path, a temporary file beside it holding `data`)."""
        local = self.fs._strip_protocol(path)
        tmp = f"{local}.tmp-{os.getpid()}-{threading.get_ident()}"
        with open(tmp, "wb") as f:
            f.write(data)
        return local, tmp

    def _create(self, path: str, data: bytes) -> None:
        """Create `path` holding `data`, atomically; FileExistsError if it exists."""
        if self._local:
            local, tmp = self._written_tmp(path, data)
            try:
                os.link(tmp, local)  # atomic: fails with FileExistsError when the name is taken
            finally:
                os.unlink(tmp)
        elif self.fs.protocol == "memory" or "memory" in self.fs.protocol:
            with _MEMORY_CREATE:
                self.fs.pipe_file(path, data, mode="create")
        else:
            self.fs.pipe_file(path, data, mode="create")

    def _replace(self, path: str, data: bytes) -> None:
        """Overwrite `path` so readers see the old or the new content, never a partial one."""
        if self._local:
            os.replace(*reversed(self._written_tmp(path, data)))
        else:
            self.fs.pipe_file(path, data)

    def _identity(self) -> dict[str, Any]:
        """Where this holder runs (kept for the lock's lifetime: renewals run in another thread)."""
        pid = os.getpid()
        return {
            "host": host_id(),
            "pid": pid,
            "pid_start": process_start(pid) or "",
            **(self.owner() if self.owner else {}),
        }

    def _payload(self, holder: str, identity: dict[str, Any]) -> bytes:
        return json.dumps({"holder": holder, "expires_at": time.time() + self.lease, **identity}).encode()

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
            where = ", ".join(f"{k} {record[k]}" for k in ("flow_run_id", "host", "pid") if record.get(k))
            left = float(str(record.get("expires_at", 0.0))) - time.time()
            logger.info("waiting for lock %s, held by a live holder (%s); its lease ends in %.0f s", name, where, left)

    def try_acquire(self, name: str, holder: str) -> bool:
        current = self._read(name)
        if current is not None:
            if current.get("holder") == holder:
                return True
            reason = None
            if float(str(current.get("expires_at", 0.0))) > time.time():
                reason = self._dead_reason(current)
                if reason is None:
                    self._announce_wait(name, current)
                    return False
            # Several waiters may see the same expired lease: only the one that atomically creates the
            # break marker of that lease removes it (the others keep polling), so a fresh lock is never
            # deleted by a late waiter. Markers stay (one tiny file per expired lease).
            marker = f"{self.folder}/{name}.break-{current.get('expires_at')}"
            try:
                self._create(marker, holder.encode())
            except FileExistsError:
                return False
            logger.warning("lock %s held by %s %s; breaking it", name, current.get("holder"), reason or "expired")
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self._path(name))
        identity = self._identity()
        try:
            self.fs.makedirs(self.folder, exist_ok=True)
            self._create(self._path(name), self._payload(holder, identity))
        except FileExistsError:
            return False
        with self._guard:
            self._held[name] = (holder, identity)
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
        current = self._read(name)
        if current is None or current.get("holder") != holder:
            raise ValueError(f"lock {name} is not held by {holder}")
        with self._guard:
            self._held.pop(name, None)
        self.fs.rm_file(self._path(name))

    def holder(self, name: str) -> str | None:
        current = self._read(name)
        if current is None or float(str(current.get("expires_at", 0.0))) <= time.time():
            return None
        return str(current.get("holder"))

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
            time.sleep(max(self.lease / 4, POLL_SECONDS))
            with self._guard:
                held = dict(self._held)
            for name, (holder, identity) in held.items():
                try:
                    if (self._read(name) or {}).get("holder") == holder:
                        self._replace(self._path(name), self._payload(holder, identity))
                except OSError as exc:  # storage hiccup: try again next round, the lease has slack
                    logger.warning("could not renew lock %s: %s", name, exc)

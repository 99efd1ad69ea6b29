"""Leased locks in the artifact store, so several workers never compute the same artifact twice.

A lock is one small JSON file `{root}/_locks/{name}.lock` = {holder, expires_at}, created atomically
with its content: a hard link from a written temporary file on a local disk (fails if the name
exists), `ifGenerationMatch=0` on GCS (gcsfs `mode="create"`), a check-and-set under a process lock
in memory://. Renewals replace the whole file atomically (rename locally; object writes on GCS).
The holder renews its lease from a background thread while it holds the lock; a holder that dies
(SIGKILL, preempted VM) stops renewing, and its lock expires after the lease (default 120 s,
`LLM_TRM_LOCK_LEASE_SECONDS`), so a retried run is never blocked for good. A holder that is stuck
but alive keeps its lock (its thread still renews).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time

from fsspec import AbstractFileSystem

logger = logging.getLogger(__name__)

LOCKS_DIR = "_locks"
LEASE_ENV = "LLM_TRM_LOCK_LEASE_SECONDS"
POLL_SECONDS = 0.2
_MEMORY_CREATE = threading.Lock()


def lease_seconds() -> float:
    return float(os.environ.get(LEASE_ENV, "120"))


class StoreLocks:
    """Named leased locks under one folder of a filesystem (thread-safe)."""

    def __init__(self, fs: AbstractFileSystem, folder: str, lease: float | None = None) -> None:
        self.fs, self.folder = fs, folder.rstrip("/")
        self.lease = lease if lease is not None else lease_seconds()
        self._held: dict[str, str] = {}  # name -> holder
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

    def _payload(self, holder: str) -> bytes:
        return json.dumps({"holder": holder, "expires_at": time.time() + self.lease}).encode()

    def try_acquire(self, name: str, holder: str) -> bool:
        current = self._read(name)
        if current is not None:
            if current.get("holder") == holder:
                return True
            if float(str(current.get("expires_at", 0.0))) > time.time():
                return False
            # Several waiters may see the same expired lease: only the one that atomically creates the
            # break marker of that lease removes it (the others keep polling), so a fresh lock is never
            # deleted by a late waiter. Markers stay (one tiny file per expired lease).
            marker = f"{self.folder}/{name}.break-{current.get('expires_at')}"
            try:
                self._create(marker, holder.encode())
            except FileExistsError:
                return False
            logger.warning("lock %s held by %s expired; breaking it", name, current.get("holder"))
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self._path(name))
        try:
            self.fs.makedirs(self.folder, exist_ok=True)
            self._create(self._path(name), self._payload(holder))
        except FileExistsError:
            return False
        with self._guard:
            self._held[name] = holder
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
            for name, holder in held.items():
                try:
                    if (self._read(name) or {}).get("holder") == holder:
                        self._replace(self._path(name), self._payload(holder))
                except OSError as exc:  # storage hiccup: try again next round, the lease has slack
                    logger.warning("could not renew lock %s: %s", name, exc)

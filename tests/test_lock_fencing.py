"""Locks safe across machines: every change is conditional on the lock's version (GCS generation, or a token
under flock locally), expiry is judged from the store's clock and the waiter's monotonic clock, never the
holder's, and a waiter gives up with a message naming the holder. gs:// runs against a GCS double that
enforces ifGenerationMatch over real HTTP (tests/helpers/gcs_preconditions.py)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from llm_trm_core.locks import LockWaitTimeoutError, StoreLocks
from llm_trm_core.store import ArtifactStore
from tests.helpers.gcs_preconditions import BUCKET, enforcing_gcs_emulator

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def strict_gcs() -> Iterator[str]:
    with enforcing_gcs_emulator() as endpoint:
        yield endpoint


@pytest.fixture(params=["file", "memory", "gs"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "file":
        return f"file://{tmp_path / 'store'}"
    if request.param == "memory":
        return f"memory://fence-{uuid.uuid4().hex[:8]}"
    request.getfixturevalue("strict_gcs")
    return f"gs://{BUCKET}/fence-{uuid.uuid4().hex[:8]}"


def _locks(root: str, lease: float, **kw: object) -> StoreLocks:
    store = ArtifactStore(root)
    return StoreLocks(store.fs, f"{store.base}/_locks", lease=lease, **kw)  # type: ignore[arg-type]


def test_the_gcs_double_enforces_generation_preconditions(strict_gcs: str) -> None:
    store = ArtifactStore(f"gs://{BUCKET}/double-{uuid.uuid4().hex[:8]}")
    fs, path = store.fs, f"{store.base}/obj"
    locks = _locks(store.root, 10)
    fs.pipe_file(path, b"one", mode="create")
    with pytest.raises(FileExistsError):
        fs.pipe_file(path, b"two", mode="create")  # ifGenerationMatch=0 over an existing object: 412
    first = str(fs.info(path)["generation"])
    second = str(locks._gcs_upload(path, b"two", first)["generation"])  # the right generation: accepted
    assert second != first and fs.cat_file(path) == b"two"
    with pytest.raises(FileExistsError):
        locks._gcs_upload(path, b"three", first)  # a stale generation: 412, nothing written
    bucket, key = locks._gcs_split(path)
    with pytest.raises(FileExistsError):
        fs.call("DELETE", "b/{}/o/{}", bucket, key, ifGenerationMatch=first)
    with pytest.raises(FileNotFoundError):
        fs.call("GET", "b/{}/o/{}", bucket, key, alt="media", generation=first)  # not the live generation
    fs.invalidate_cache(path)
    assert fs.cat_file(path) == b"two"
    fs.call("DELETE", "b/{}/o/{}", bucket, key, ifGenerationMatch=second)
    fs.invalidate_cache(path)
    assert not fs.exists(path)


CONTEND = """
import sys
from llm_trm_core.locks import StoreLocks
from llm_trm_core.store import ArtifactStore
store = ArtifactStore(sys.argv[1])
locks = StoreLocks(store.fs, f"{store.base}/_locks", lease=2.0)
print("ready", flush=True)
sys.stdin.readline()
won = locks.acquire("dead", sys.argv[2], timeout=6.0)
print("won" if won else "lost", flush=True)
if won:
    sys.stdin.readline()
    locks.release("dead", sys.argv[2])
"""


def test_exactly_one_of_several_processes_breaks_an_expired_lock_on_gcs(strict_gcs: str) -> None:
    root = f"gs://{BUCKET}/procs-{uuid.uuid4().hex[:8]}"
    store = ArtifactStore(root)
    dead = {"holder": "X", "expires_at": time.time() + 3600, "host": "elsewhere", "pid": 1}
    store.fs.pipe_file(f"{store.base}/_locks/dead.lock", json.dumps(dead).encode())
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CONTEND, root, f"P{i}"],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(3)
    ]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        results = [p.stdout.readline().strip() for p in procs if p.stdout is not None]
        assert sorted(results) == ["lost", "lost", "won"], results
        assert _locks(root, 30).holder("dead") == f"P{results.index('won')}"
        for p in procs:
            p.communicate("done\n", timeout=30)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def test_a_stalled_holder_cannot_overwrite_the_lock_taken_over_and_learns_it_lost_it(
    root: str, caplog: pytest.LogCaptureFixture
) -> None:
    a = _locks(root, lease=1.0, owner=lambda: {"flow_run_id": "run-a"})
    b = _locks(root, lease=1.0, owner=lambda: {"flow_run_id": "run-b"})
    assert a.try_acquire("stage", "A")
    with a._ops:  # A stalls: its renewer cannot run (a GC pause, a frozen VM, a lost network)
        assert b.acquire("stage", "B", timeout=6.0)  # after A's version stayed unchanged for the lease
        assert a.still_held("stage", "A") is False
    with caplog.at_level(logging.ERROR, logger="llm_trm_core.locks"):
        a.renew()  # A wakes up: its conditional renewal fails instead of overwriting B's lock
        time.sleep(0.3)  # (or its renewer thread got there first)
    record = b.record("stage")
    assert record is not None and record["holder"] == "B" and b.still_held("stage", "B")
    assert not a.still_held("stage", "A") and "stage" not in a._held
    assert any("lost by A" in r.getMessage() and "run-b" in r.getMessage() for r in caplog.records), caplog.text
    with pytest.raises(ValueError, match="not held by A.*lost to B"):
        a.release("stage", "A")  # and cannot delete B's lock either
    assert b.still_held("stage", "B")
    b.release("stage", "B")
    assert b.record("stage") is None


def test_expiry_is_judged_without_the_holders_clock(root: str) -> None:
    # a live holder whose clock is an hour behind: its expires_at is always in the past, it is never broken
    slow = _locks(root, lease=1.0)
    slow._wall = lambda: time.time() - 3600
    assert slow.try_acquire("live", "slow")
    record = slow.record("live")
    assert record is not None and record["expires_at"] < time.time() - 3000
    # a dead holder whose clock was an hour ahead: its expires_at is far in the future, it expires after the lease
    store = ArtifactStore(root)
    ahead = {"holder": "ahead", "expires_at": time.time() + 3600, "host": "elsewhere", "pid": 1}
    store.fs.pipe_file(f"{store.base}/_locks/dead.lock", json.dumps(ahead).encode())

    waiter = _locks(root, lease=1.0)
    started = time.monotonic()
    took: list[float] = []

    def take_dead() -> None:
        if waiter.acquire("dead", "waiter", timeout=8.0):
            took.append(time.monotonic() - started)

    t = threading.Thread(target=take_dead)
    t.start()
    while time.monotonic() - started < 3.0:  # three leases: the slow-clocked holder keeps its lock
        assert not waiter.try_acquire("live", "waiter") and waiter.holder("live") == "slow"
        time.sleep(0.2)
    t.join()
    assert took and 0.9 <= took[0] < 3.5, took
    slow.release("live", "slow")
    waiter.release("dead", "waiter")


def test_a_lock_left_behind_long_ago_is_broken_at_once_by_the_stores_clock(tmp_path: Path) -> None:
    root = f"file://{tmp_path / 'store'}"
    store = ArtifactStore(root)
    path = tmp_path / "store" / "_locks" / "old.lock"
    store.fs.makedirs(f"{store.base}/_locks", exist_ok=True)
    path.write_text(json.dumps({"holder": "gone", "expires_at": time.time() + 3600, "host": "elsewhere"}))
    os.utime(path, (time.time() - 600, time.time() - 600))  # last written ten minutes ago (store's clock)
    started = time.monotonic()
    assert _locks(root, lease=60).acquire("old", "me", timeout=5.0)
    assert time.monotonic() - started < 2.0


def test_a_waiter_gives_up_with_one_line_naming_the_holder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tasks.caching import StoreLockManager

    root = f"file://{tmp_path / 'store'}"
    manager = StoreLockManager(root)
    holder = StoreLocks(manager.locks.fs, manager.locks.folder, lease=1.0, owner=lambda: {"flow_run_id": "run-42"})
    assert holder.try_acquire("stage-key", "other-worker")  # alive on this host: never broken, renews its lease
    monkeypatch.setenv("LLM_TRM_LOCK_WAIT_SECONDS", "1.5")
    with pytest.raises(LockWaitTimeoutError) as caught:
        manager.acquire_lock("stage-key", "me")
    message = str(caught.value)
    assert "\n" not in message and "stage-key" in message and "other-worker" in message
    assert "flow run run-42" in message and f"pid {os.getpid()}" in message and "host " in message
    assert "waiting 2 s" in message or "waiting 1 s" in message
    assert "LLM_TRM_LOCK_WAIT_SECONDS" in message
    with pytest.raises(LockWaitTimeoutError, match="stage-key"):
        manager.wait_for_lock("stage-key")
    assert manager.acquire_lock("stage-key", "me", acquire_timeout=0.3) is False  # an explicit timeout: False
    assert manager.is_lock_holder("stage-key", "other-worker") and not manager.is_lock_holder("stage-key", "me")
    holder.release("stage-key", "other-worker")
    assert manager.acquire_lock("stage-key", "me")
    manager.release_lock("stage-key", "me")

"""Prefect caching keyed on the artifact store, with records and locks under the store root.

Every stage task runs as `cached(task, cfg)(...)`:
- cache key = sha256 of the task name, the stage's code version, the stage's config view (the same
  sections that make up its artifact key, llm_trm_core.stages.keys) and its upstream artifact keys: the
  ingredients of the store key, so a config change re-runs exactly the stages whose artifacts change;
- Prefect's cache records (`_prefect/cache-keys`) and results (`_prefect/results`) live under the store
  root, so every worker reads them and a fresh Prefect database still hits the cache;
- a result holds only the artifact's stage and key (`ManifestRefSerializer`): a cache hit is answered by
  reading the manifest from the store the task run uses (digest-checked), so after a store is copied or
  moved the returned manifest carries the current root's URIs and the store's values, never a stale copy;
- a record whose artifact was deleted from the store is dropped before lookup (the stage recomputes), and
  so is one holding a copy of a manifest (written by an older llm-trm);
- SERIALIZABLE isolation with leased store locks (`_prefect/locks`): two runs of one config compute
  each stage once, the second waits and then reads the cached result;
- without a record (new root, records deleted) the task still finds the committed manifest and
  returns at once: the store is the source of truth, Prefect's cache only skips scheduling work.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, TypeVar

from prefect import Task
from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext
from prefect.filesystems import LocalFileSystem, RemoteFileSystem
from prefect.locking.protocol import LockManager
from prefect.results import ResultStore
from prefect.serializers import JSONSerializer, Serializer
from prefect.transactions import IsolationLevel
from pydantic import Field

from llm_trm_core.config import PipelineConfig
from llm_trm_core.errors import ArtifactError, ArtifactNotCommittedError
from llm_trm_core.locks import WAIT_ENV, LockWaitTimeoutError, StoreLocks, describe_holder, wait_seconds
from llm_trm_core.stages.declaration import stage_of_task
from llm_trm_core.stages.keys import stage_config
from llm_trm_core.store import ArtifactStore
from tasks.liveness import lock_holder_ended, lock_owner

logger = logging.getLogger(__name__)

PREFECT_DIR = "_prefect"
MANIFEST_REF = "llm-trm-manifest-ref"  # the serializer type recorded in every result's metadata
T = TypeVar("T", bound=Task[Any, Any])


def _is_manifest(value: Any) -> bool:
    return isinstance(value, dict) and "stage" in value and "key" in value


def _input_view(value: Any) -> Any:
    """Manifests by their artifact key; scalars as they are; anything else is not cacheable."""
    if _is_manifest(value):
        return f"{value['stage']}:{value['key']}"
    if isinstance(value, list | tuple):
        return [_input_view(v) for v in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    raise TypeError(f"uncacheable task input of type {type(value).__name__}")


class StoreKeyPolicy(CachePolicy):
    """Cache key from the store-key ingredients; drops records whose artifact left the store."""

    def __init__(self, root: str) -> None:
        super().__init__()
        self.root = root

    def compute_key(
        self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any
    ) -> str | None:
        name = task_ctx.task.name
        cfg = inputs.get("cfg")
        declared = stage_of_task(name)
        if declared is None or not isinstance(cfg, PipelineConfig):
            logger.warning("task %s has no store-key cache policy mapping; it runs uncached", name)
            return None
        try:
            others = {k: _input_view(v) for k, v in sorted(inputs.items()) if k != "cfg"}
        except TypeError as exc:
            logger.warning("task %s runs uncached: %s", name, exc)
            return None
        scalars = {k: v for k, v in inputs.items() if k != "cfg" and not _is_manifest(v) and not isinstance(v, list)}
        blob = {
            "task": name,
            "code_version": declared.version,
            "config": stage_config(cfg, declared.name, scalars),
            "inputs": others,
            "store": cfg.store.root,
        }
        key = hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()
        self._drop_stale_record(key)
        return key

    def _drop_stale_record(self, key: str) -> None:
        """Drop a record the store cannot answer now, before Prefect looks it up.

        Its artifact is gone (the stage recomputes), its manifest is unreadable or corrupt (the task then
        reads the store itself and raises the error naming it), or it holds a copy of a manifest (older
        llm-trm). Checked here, before the transaction takes its lock, because an error raised while
        Prefect reads a cache hit leaves that lock held.
        """
        store = ArtifactStore(self.root)
        record_path = f"{store.base}/{PREFECT_DIR}/cache-keys/{key}"
        if not store.fs.exists(record_path):
            return
        try:
            record = _result_store(self.root).read(key)  # resolves the reference through the store
        except ArtifactNotCommittedError as exc:
            logger.warning("%s: dropping its cache record", exc)
        except Exception as exc:
            logger.warning("dropping Prefect cache record %s, the store cannot answer it: %s", key, exc)
        else:
            if record.metadata.serializer.type == MANIFEST_REF:
                return
            logger.warning("dropping Prefect cache record %s: it holds a copy of a manifest, not a reference", key)
        store.fs.rm_file(record_path)


class ManifestRefSerializer(Serializer):
    """A stage task's Prefect result: only its artifact's stage and key, resolved through the store on read.

    `loads` runs on a cache hit, inside the task run: it reads `_MANIFEST.json` (digest-checked) from the
    store of the task's cache policy, i.e. the `cfg.store.root` of this run, so the returned manifest is
    the store's own, with the current root's URIs, even when the record was written under another root.
    """

    type: str = Field(default=MANIFEST_REF, frozen=True)

    def dumps(self, obj: dict[str, Any]) -> bytes:
        if not _is_manifest(obj):
            raise TypeError(f"a cached stage task must return a manifest, not {type(obj).__name__}")
        return json.dumps({"stage": obj["stage"], "key": obj["key"]}).encode()

    def loads(self, blob: bytes) -> dict[str, Any]:
        ref = json.loads(blob)
        store = ArtifactStore(_current_root())
        manifest = store.read_manifest(ref["stage"], ref["key"])
        if manifest is None:
            raise ArtifactNotCommittedError(
                f"Prefect's cache record points at {store.uri(ref['stage'], ref['key'])}, which is not committed"
            )
        return manifest.model_dump(mode="json")


def _current_root() -> str:
    """The store root of the running cached task (its StoreKeyPolicy's)."""
    ctx = TaskRunContext.get()
    policy = ctx.task.cache_policy if ctx is not None else None
    if not isinstance(policy, StoreKeyPolicy):
        raise ArtifactError(
            "a stage result reference can only be resolved inside a task run made by tasks.caching.cached()"
        )
    return policy.root


def _result_store(root: str) -> ResultStore:
    return ResultStore(
        result_storage=result_storage_for(root),
        metadata_storage=_block(key_storage_for(root)),
        serializer=JSONSerializer(),
    )


class StoreLockManager(LockManager):
    """Prefect's lock protocol over leased, fenced locks in the artifact store (llm_trm_core.locks).

    Prefect asks without a timeout; a wait is then bounded by `LLM_TRM_LOCK_WAIT_SECONDS` (default 6 h)
    and ends in a `LockWaitTimeoutError` naming the lock and its holder. `is_lock_holder` asks the store
    (the version this worker wrote last must still be there), so a holder that lost its lock while stalled
    cannot write the task's cache record: Prefect refuses to write a record locked by another holder.
    """

    def __init__(self, root: str) -> None:
        store = ArtifactStore(root)
        self.locks = StoreLocks(
            store.fs, f"{store.base}/{PREFECT_DIR}/locks", owner=lock_owner, is_dead=lock_holder_ended
        )

    def _timed_out(self, key: str, waited: float) -> LockWaitTimeoutError:
        return LockWaitTimeoutError(
            f"gave up after waiting {waited:.0f} s for lock {key} ({self.locks.folder}), held by "
            f"{describe_holder(self.locks.record(key))}, which keeps renewing it; if that run is stuck, cancel it "
            f"(or stop its process) and retry, or wait longer with {WAIT_ENV}=<seconds>"
        )

    def acquire_lock(
        self, key: str, holder: str, acquire_timeout: float | None = None, hold_timeout: float | None = None
    ) -> bool:
        if acquire_timeout is not None:
            return self.locks.acquire(key, holder, acquire_timeout)
        started = time.monotonic()
        if self.locks.acquire(key, holder, wait_seconds()):
            return True
        raise self._timed_out(key, time.monotonic() - started)

    async def aacquire_lock(
        self, key: str, holder: str, acquire_timeout: float | None = None, hold_timeout: float | None = None
    ) -> bool:
        return self.acquire_lock(key, holder, acquire_timeout, hold_timeout)

    def release_lock(self, key: str, holder: str) -> None:
        self.locks.release(key, holder)

    def is_locked(self, key: str) -> bool:
        return self.locks.holder(key) is not None

    def is_lock_holder(self, key: str, holder: str) -> bool:
        return self.locks.still_held(key, holder)

    def wait_for_lock(self, key: str, timeout: float | None = None) -> bool:
        if timeout is not None:
            return self.locks.wait(key, timeout)
        started = time.monotonic()
        if self.locks.wait(key, wait_seconds()):
            return True
        raise self._timed_out(key, time.monotonic() - started)

    async def await_for_lock(self, key: str, timeout: float | None = None) -> bool:
        return self.wait_for_lock(key, timeout)


def _block(storage: Any) -> Any:
    return LocalFileSystem(basepath=str(storage)) if isinstance(storage, Path) else storage


def _local_path(root: str) -> Path | None:
    store = ArtifactStore(root)
    protocols = {store.fs.protocol} if isinstance(store.fs.protocol, str) else set(store.fs.protocol)
    return Path(store.base) if protocols & {"file", "local"} else None


def key_storage_for(root: str) -> Any:
    local = _local_path(root)
    if local is not None:
        return local / PREFECT_DIR / "cache-keys"
    return RemoteFileSystem(basepath=f"{ArtifactStore(root).root}/{PREFECT_DIR}/cache-keys")


@functools.cache
def result_storage_for(root: str) -> Any:
    """`{root}/_prefect/results` as a saved storage block (local or remote).

    Saved, not a bare path: Prefect then records result keys relative to the block, so the records stay
    valid when the store is copied or moved (and Prefect requires saved blocks for remote result storage).
    """
    store = ArtifactStore(root)
    local = _local_path(root)
    block: LocalFileSystem | RemoteFileSystem
    if local is not None:
        block = LocalFileSystem(basepath=str(local / PREFECT_DIR / "results"))
    else:
        block = RemoteFileSystem(basepath=f"{store.root}/{PREFECT_DIR}/results")
    name = "llm-trm-results-" + hashlib.sha256(store.root.encode()).hexdigest()[:12]
    block.save(name, overwrite=True)
    return block


@functools.cache
def _policy(root: str) -> CachePolicy:
    return StoreKeyPolicy(root).configure(
        key_storage=key_storage_for(root),
        lock_manager=StoreLockManager(root),
        isolation_level=IsolationLevel.SERIALIZABLE,
    )


def cached(task: T, cfg: PipelineConfig) -> T:
    """The task with the store-keyed cache policy, manifest-reference results and locks under `cfg.store.root`."""
    root = ArtifactStore(cfg.store.root).root  # absolute: a relative root means the current directory's store
    return task.with_options(  # type: ignore[return-value]
        cache_policy=_policy(root),
        result_storage=result_storage_for(root),
        result_serializer=ManifestRefSerializer(),
        persist_result=True,
    )

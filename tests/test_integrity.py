"""Every byte read from a committed artifact is verified first, manifests carry their own digest, and a
Prefect cache hit is answered from the store (real files, real Parquet and safetensors, a real Prefect
server)."""

from __future__ import annotations

import io
import json
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load as load_safetensors

from llm_trm_core.arrow import STATE_WRITE_OPTIONS, adopt_parquet, iter_parquet, read_parquet
from llm_trm_core.errors import ArtifactCorruptError, UserError
from llm_trm_core.hidden_states import HiddenStates, ShardedStatesWriter
from llm_trm_core.models.compressor import LinearCompressor
from llm_trm_core.stages.compressor import CONFIG_FILE, WEIGHTS_FILE, load_compressor
from llm_trm_core.store import MANIFEST_NAME, ArtifactStore, manifest_digest

MIB = 1 << 20


def _flip_middle(store: ArtifactStore, path: str, count: int = 8) -> None:
    """Same size, other bytes: invert `count` bytes in the middle of the file."""
    data = bytearray(store.fs.cat_file(path))
    middle = len(data) // 2
    for i in range(middle, middle + count):
        data[i] ^= 0xFF
    store.fs.pipe_file(path, bytes(data))


def _assert_clear(exc: pytest.ExceptionInfo[ArtifactCorruptError], culprit: str, folder: str) -> None:
    message = str(exc.value)
    assert "\n" not in message, message
    assert culprit in message and f"delete {folder} and re-run; it will be recomputed" in message, message


def _hidden_states(store: ArtifactStore) -> tuple[HiddenStates, str]:
    """A committed hidden-states artifact with one ~2 MiB float32 shard (real Parquet, uncompressed vectors, page
    checksums)."""
    states = torch.randn(1000, 512, generator=torch.Generator().manual_seed(0))
    with store.writer("hiddens", "k", config={}, code_version="test") as w:
        shards = ShardedStatesWriter(w, 512, "float32", rows_per_shard=1000)
        shards.add("train", "doc0", np.arange(1000), states)
        shards.close()
        w.commit({"tokens": 1000})
    hidden = HiddenStates.open(store.open("hiddens", "k"))
    return hidden, hidden.shards("train")[0]


def test_same_size_corruption_inside_a_large_parquet_shard_is_refused_before_use(tmp_path: Path) -> None:
    store = ArtifactStore(f"file://{tmp_path / 'store'}")
    hidden, shard = _hidden_states(store)
    torch.testing.assert_close(
        hidden.read_shard(shard)[:2], torch.randn(1000, 512, generator=torch.Generator().manual_seed(0))[:2]
    )
    path = hidden.artifact.path(shard)
    assert store.fs.size(path) > MIB  # larger than the old "small file" sha256 limit

    _flip_middle(store, path)
    corrupted = HiddenStates.open(store.open("hiddens", "k"))  # opening lists sizes only: still the same
    with pytest.raises(ArtifactCorruptError, match="does not match its xxh3-128 digest") as exc:
        corrupted.read_shard(shard)
    _assert_clear(exc, hidden.artifact.file_uri(shard), hidden.artifact.uri)
    with pytest.raises(ArtifactCorruptError, match="sha256"):
        store.open("hiddens", "k", verify="sha256")


def test_shards_read_ahead_are_verified_in_order_and_a_corrupt_one_fails_when_reached(tmp_path: Path) -> None:
    """iter_parquet reads file i+1 on a helper thread while the caller holds file i (files of at least
    read_ahead_from bytes); each table equals read_parquet's; a corrupted file is refused (the usual one line)
    only when the caller reaches it, after the files before it; a caller that stops early leaves no thread
    behind. Files under read_ahead_from bytes are read on the caller's thread, with the same checks."""
    store = ArtifactStore(f"file://{tmp_path / 'store'}")
    names = [f"part-{i}.parquet" for i in range(4)]
    with store.writer("demo", "k", config={}, code_version="test") as w:
        for i, name in enumerate(names):
            with w.open(name) as f:
                pq.write_table(pa.table({"x": np.arange(i * 1000, (i + 1) * 1000)}), f)
        w.commit()
    art = store.open("demo", "k")
    started = {name: threading.Event() for name in names}
    reads: list[tuple[str, str]] = []
    read_buffer = art.read_buffer

    def recording(relpath: str) -> memoryview:
        reads.append((relpath, threading.current_thread().name))
        started[relpath].set()
        return read_buffer(relpath)

    art.read_buffer = recording  # type: ignore[method-assign]
    tables = iter_parquet(art, names, read_ahead_from=0)
    first = next(tables)
    assert started[names[1]].wait(10)  # the next file is being read while the caller still holds the first
    rest = list(tables)
    assert [t.column("x")[0].as_py() for t in [first, *rest]] == [0, 1000, 2000, 3000]
    assert [n for n, _ in reads] == names and all(thread.startswith("read-ahead") for _, thread in reads)
    assert all(t.equals(read_parquet(art, n)) for t, n in zip([first, *rest], names, strict=True))

    reads.clear()
    inline = list(iter_parquet(art, names, read_ahead_from=max(art.size(n) for n in names) + 1))
    assert all(t.equals(r) for t, r in zip(inline, [first, *rest], strict=True))
    assert reads == [(n, threading.current_thread().name) for n in names]  # each on the caller's thread

    _flip_middle(store, art.path(names[2]), count=4)
    for read_ahead_from in (0, 1 << 30):
        seen = []
        with pytest.raises(ArtifactCorruptError, match="does not match its xxh3-128 digest") as exc:
            for table in iter_parquet(store.open("demo", "k"), names, read_ahead_from=read_ahead_from):
                seen.append(table.column("x")[0].as_py())
        assert seen == [0, 1000]  # raised when file 2 is reached, not when it was read ahead
        _assert_clear(exc, art.file_uri(names[2]), art.uri)

    before = threading.active_count()
    abandoned = iter_parquet(store.open("demo", "k"), names[:2], read_ahead_from=0)
    next(abandoned)
    abandoned.close()  # waits for the file read ahead, then lets the helper thread go
    assert threading.active_count() == before


def test_a_page_corrupted_before_adoption_is_caught_by_the_parquet_page_checksum(tmp_path: Path) -> None:
    """A resumed writer adopts a published file by hashing it as it is; the page CRC still catches a bad page."""
    values = np.random.default_rng(0).standard_normal(400_000).astype(np.float32)
    sink = io.BytesIO()
    options = {**STATE_WRITE_OPTIONS, "compression": "none"}  # raw floats: nothing else would notice
    pq.write_table(pa.table({"state": values}), sink, **options)
    data = bytearray(sink.getvalue())
    middle = len(data) // 2
    data[middle : middle + 4] = bytes(b ^ 0x55 for b in data[middle : middle + 4])  # inside a data page
    # without verification the damaged page decodes silently into other numbers: what the checksum is for
    silent = pq.read_table(pa.BufferReader(bytes(data))).column("state").to_numpy()
    assert 1 <= int((silent != values).sum()) <= 2

    store = ArtifactStore(f"file://{tmp_path / 'store'}")
    store.fs.makedirs(store.path("demo", "k"), exist_ok=True)
    store.fs.pipe_file(store.path("demo", "k", "part.parquet"), bytes(data))  # published by an earlier attempt
    with store.writer("demo", "k", config={}, code_version="test") as w:
        w.adopt("part.parquet")
        with pytest.raises(ArtifactCorruptError, match="not a valid Parquet file") as exc:
            read_parquet(w, "part.parquet")  # a writer reading back its own parts (datagen resume)
        _assert_clear(exc, w.file_uri("part.parquet"), w.uri)
        w.commit()
    with pytest.raises(ArtifactCorruptError, match="(?i)checksum|crc") as exc:
        read_parquet(store.open("demo", "k"), "part.parquet")
    _assert_clear(exc, store.uri("demo", "k", "part.parquet"), store.uri("demo", "k"))

    # vector shards skip page checksums on reads (the whole-file digest covers them), so a resumed writer
    # checks them when it adopts a part instead: the damaged part is refused, never recorded
    store.fs.makedirs(store.path("demo", "k2"), exist_ok=True)
    store.fs.pipe_file(store.path("demo", "k2", "part.parquet"), bytes(data))
    with store.writer("demo", "k2", config={}, code_version="test") as w:
        with pytest.raises(ArtifactCorruptError, match="(?i)checksum|crc") as exc:
            adopt_parquet(w, "part.parquet")
        _assert_clear(exc, w.file_uri("part.parquet"), w.uri)
        assert "part.parquet" not in w.files
        w.commit()


def test_same_size_corruption_of_a_safetensors_file_is_refused(tmp_path: Path) -> None:
    store = ArtifactStore(f"file://{tmp_path / 'store'}")
    model = LinearCompressor(1024, 512)
    weights, config = model.to_bytes()
    with store.writer("compressor", "k", config={}, code_version="test") as w:
        w.write_bytes(WEIGHTS_FILE, weights)
        w.write_bytes(CONFIG_FILE, config)
        manifest = w.commit({"d_prime": 512})
    assert manifest.files[WEIGHTS_FILE].size > MIB
    torch.testing.assert_close(load_compressor(store, manifest).weight, model.weight)

    path = store.path("compressor", "k", WEIGHTS_FILE)
    _flip_middle(store, path)
    # safetensors itself loads the damaged tensor data without a word
    assert not torch.equal(load_safetensors(store.fs.cat_file(path))["weight"], model.weight.detach())
    with pytest.raises(ArtifactCorruptError, match="does not match its xxh3-128 digest") as exc:
        load_compressor(store, manifest)
    _assert_clear(exc, store.uri("compressor", "k", WEIGHTS_FILE), store.uri("compressor", "k"))


def _rewrite_manifest(store: ArtifactStore, stage: str, key: str, edit: Any, redigest: bool) -> None:
    path = store.path(stage, key, MANIFEST_NAME)
    fields = json.loads(store.fs.cat_file(path))
    edit(fields)
    if redigest:
        fields["manifest_sha256"] = manifest_digest(fields)
    store.fs.pipe_file(path, json.dumps(fields, indent=2).encode())


def test_a_hand_edited_manifest_is_refused_naming_it(store_root: str) -> None:
    store = ArtifactStore(store_root)
    with store.writer("demo", "k", config={"a": 1}, code_version="1") as w:
        w.write_json("meta.json", {"rows": 3})
        committed = w.commit({"rows": 3, "loss": 0.5})
    assert store.read_manifest("demo", "k") == committed and len(committed.manifest_sha256) == 64

    _rewrite_manifest(store, "demo", "k", lambda m: m["metrics"].update(loss=0.25), redigest=False)
    manifest_uri, folder = store.uri("demo", "k", MANIFEST_NAME), store.uri("demo", "k")
    for read in (lambda: store.read_manifest("demo", "k"), lambda: store.open("demo", "k")):
        with pytest.raises(ArtifactCorruptError, match="does not match its manifest_sha256") as exc:
            read()
        _assert_clear(exc, manifest_uri, folder)
    assert isinstance(exc.value, UserError)  # never retried

    # a file's recorded sha256 edited to match a tampered file is caught the same way
    _rewrite_manifest(store, "demo", "k", lambda m: m["metrics"].update(loss=0.5), redigest=False)
    assert store.read_manifest("demo", "k") == committed  # back to the committed content
    _rewrite_manifest(store, "demo", "k", lambda m: m["files"]["meta.json"].update(sha256="0" * 64), redigest=False)
    with pytest.raises(ArtifactCorruptError, match="manifest_sha256"):
        store.open("demo", "k")

    # a manifest copied into another artifact's folder, and one from before digests
    store.fs.makedirs(store.path("demo", "other"), exist_ok=True)
    with store.writer("demo", "k2", config={}, code_version="1") as w:
        w.commit()
    store.fs.pipe_file(
        store.path("demo", "other", MANIFEST_NAME), store.fs.cat_file(store.path("demo", "k2", MANIFEST_NAME))
    )
    with pytest.raises(ArtifactCorruptError, match="belongs to demo/k2"):
        store.read_manifest("demo", "other")
    _rewrite_manifest(store, "demo", "k2", lambda m: (m.pop("manifest_sha256"), m.update(schema_version=1)), False)
    with pytest.raises(ArtifactCorruptError, match="manifest schema 1") as exc:
        store.read_manifest("demo", "k2")
    _assert_clear(exc, store.uri("demo", "k2", MANIFEST_NAME), store.uri("demo", "k2"))


@pytest.mark.usefixtures("prefect_server")
def test_a_cache_hit_is_answered_from_the_current_store_after_the_store_is_copied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect import flow

    from llm_trm_core.config import load_config
    from tasks.caching import cached
    from tasks.stage import stage_task

    problems_task = stage_task("problems")

    @flow
    def problems_flow(cfg: Any) -> dict[str, Any]:
        state = cached(problems_task, cfg)(cfg, return_state=True)
        return {"state": state.name, "manifest": state.result()}

    cfg = load_config("tiny", ["store.root=file://./store"])  # relative: the same config in both places
    first_dir, second_dir = tmp_path / "first", tmp_path / "second"
    first_dir.mkdir()
    monkeypatch.chdir(first_dir)
    first = problems_flow(cfg)
    assert first["state"] == "Completed" and first["manifest"]["uri"].startswith(f"file://{first_dir}/store/")
    assert problems_flow(cfg)["state"] == "Cached"

    shutil.copytree(first_dir / "store", second_dir / "store")  # the Prefect records travel with the store
    copy = ArtifactStore(f"file://{second_dir}/store")
    key = first["manifest"]["key"]
    _rewrite_manifest(copy, "problems", key, lambda m: m["metrics"].update(copied=True), redigest=True)
    monkeypatch.chdir(second_dir)
    again = problems_flow(cfg)
    assert again["state"] == "Cached"
    manifest = again["manifest"]
    assert manifest["uri"] == copy.uri("problems", key) and manifest["uri"].startswith(f"file://{second_dir}/store/")
    assert manifest["metrics"] == {**first["manifest"]["metrics"], "copied": True}  # the store's values
    assert str(first_dir) not in json.dumps(manifest)

    # a hand-edited metric fails the cache hit with the manifest's name, not a silently different value
    _rewrite_manifest(copy, "problems", key, lambda m: m["metrics"].update(total=1), redigest=False)
    with pytest.raises(ArtifactCorruptError, match="manifest_sha256") as exc:
        problems_flow(cfg)
    assert copy.uri("problems", key, MANIFEST_NAME) in str(exc.value)

    # an artifact deleted from the store is recomputed although Prefect holds a record for it
    copy.fs.rm(copy.path("problems", key), recursive=True)
    healed = problems_flow(cfg)
    assert healed["state"] == "Completed" and healed["manifest"]["uri"] == copy.uri("problems", key)
    assert problems_flow(cfg)["state"] == "Cached"

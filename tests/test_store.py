"""The artifact store on file://, memory:// and gs:// (a real local GCS emulator)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llm_trm_core.errors import ArtifactCorruptError, ArtifactError, ArtifactNotCommittedError
from llm_trm_core.store import MANIFEST_NAME, TMP_MARKER, ArtifactStore, manifest_digest, stage_key

REPO = Path(__file__).resolve().parent.parent


def _write_demo(store: ArtifactStore, key: str) -> None:
    with store.writer("demo", key, config={"a": 1}, code_version="1", upstream={"up": "k0"}) as w:
        w.write_json("meta.json", {"rows": 3})
        with w.open("shards/part-0.parquet") as f:
            pq.write_table(pa.table({"x": [1, 2, 3]}), f)
        w.commit({"rows": 3, "loss": 0.5})


def test_roundtrip_and_manifest(store_root: str) -> None:
    store = ArtifactStore(store_root)
    key = stage_key("demo", "1", {"a": 1}, {"up": "k0"})
    assert store.read_manifest("demo", key) is None
    _write_demo(store, key)

    art = store.open("demo", key, verify="sha256")
    m = art.manifest
    assert m.stage == "demo" and m.key == key and m.upstream == {"up": "k0"}
    assert m.metrics == {"rows": 3, "loss": 0.5}
    assert set(m.files) == {"meta.json", "shards/part-0.parquet"}
    assert m.files["meta.json"].size == len(art.read_bytes("meta.json"))
    assert m.created_at <= m.completed_at and m.package_version
    assert art.read_json("meta.json") == {"rows": 3}
    with art.open("shards/part-0.parquet") as f:
        assert pq.read_table(f).column("x").to_pylist() == [1, 2, 3]
    assert store.list_keys("demo") == [key]
    assert art.uri.startswith(store_root.split("://")[0])
    # the manifest is plain JSON with the documented fields
    raw = json.loads(store.fs.cat(store.path("demo", key, MANIFEST_NAME)))
    assert {"config", "upstream", "files", "metrics", "git_sha", "created_at", "completed_at"} <= set(raw)
    assert raw["manifest_sha256"] == m.manifest_sha256 == manifest_digest(raw) and m.uri == art.uri


def test_uncommitted_artifact_is_refused(store_root: str) -> None:
    store = ArtifactStore(store_root)
    with pytest.raises(ArtifactNotCommittedError, match="run the stage first"):
        store.open("demo", "nothing")
    w = store.writer("demo", "half", config={}, code_version="1")
    w.write_bytes("data.bin", b"abc")  # no commit
    with pytest.raises(ArtifactNotCommittedError, match="no manifest"):
        store.open("demo", "half")
    assert store.list_keys("demo") == []


def test_size_mismatch_and_missing_file_are_refused(store_root: str) -> None:
    store = ArtifactStore(store_root)
    _write_demo(store, "k1")
    original = store.fs.cat(store.path("demo", "k1", "meta.json"))
    store.fs.pipe(store.path("demo", "k1", "meta.json"), original + b" ")  # grown by one byte
    with pytest.raises(ArtifactCorruptError, match="bytes, the manifest says"):
        store.open("demo", "k1")

    _write_demo(store, "k2")
    store.fs.pipe(store.path("demo", "k2", "meta.json"), original.replace(b"3", b"4"))  # same size, other bytes
    art = store.open("demo", "k2")  # opening checks sizes; the bytes are checked when they are read
    with pytest.raises(ArtifactCorruptError, match="meta.json does not match its xxh3-128 digest") as info:
        art.read_json("meta.json")
    assert str(info.value).endswith(f"delete {art.uri} and re-run; it will be recomputed")
    with pytest.raises(ArtifactCorruptError, match="sha256"):
        store.open("demo", "k2", verify="sha256")

    _write_demo(store, "k3")
    store.fs.rm(store.path("demo", "k3", "shards/part-0.parquet"))
    with pytest.raises(ArtifactCorruptError, match="missing"):
        store.open("demo", "k3")


def test_each_file_records_sha256_and_xxh3_and_older_manifests_are_read_with_sha256(store_root: str) -> None:
    """Reads check xxh3-128 (fast); manifests written before it was recorded still verify with sha256."""
    import hashlib

    import xxhash

    store = ArtifactStore(store_root)
    _write_demo(store, "k")
    data = store.fs.cat(store.path("demo", "k", "meta.json"))
    entry = store.read_manifest("demo", "k").files["meta.json"]  # type: ignore[union-attr]
    assert entry.sha256 == hashlib.sha256(data).hexdigest() and entry.xxh3_128 == xxhash.xxh3_128_hexdigest(data)

    path = store.path("demo", "k", MANIFEST_NAME)
    fields = json.loads(store.fs.cat(path))
    for file_entry in fields["files"].values():
        del file_entry["xxh3_128"]  # as an older llm-trm wrote it
    fields["manifest_sha256"] = manifest_digest(fields)
    store.fs.pipe(path, json.dumps(fields).encode())
    art = store.open("demo", "k")
    assert art.manifest.files["meta.json"].xxh3_128 is None and art.read_json("meta.json") == {"rows": 3}
    store.fs.pipe(store.path("demo", "k", "meta.json"), data.replace(b"3", b"4"))
    with pytest.raises(ArtifactCorruptError, match="meta.json does not match its sha256"):
        store.open("demo", "k").read_json("meta.json")


def test_writer_rules(store_root: str) -> None:
    store = ArtifactStore(store_root)
    _write_demo(store, "k")
    with pytest.raises(ArtifactError, match="already committed"):
        store.writer("demo", "k", config={}, code_version="1")
    w = store.writer("demo", "other", config={}, code_version="1")
    for bad in ("../escape", "/abs", "a//b", MANIFEST_NAME, f"x{TMP_MARKER}1"):
        with pytest.raises(ArtifactError):
            w.write_bytes(bad, b"")
    with pytest.raises(ArtifactError, match="without commit"), store.writer("demo", "k4", config={}, code_version="1"):
        pass
    with pytest.raises(ArtifactError, match="has no file"):
        store.open("demo", "k").read_bytes("nope.bin")


def test_stale_temporaries_removed_and_published_files_adopted(store_root: str) -> None:
    store = ArtifactStore(store_root)
    store.fs.makedirs(store.path("demo", "k"), exist_ok=True)
    store.fs.pipe(store.path("demo", "k", f"big.bin{TMP_MARKER}dead"), b"partial")
    store.fs.pipe(store.path("demo", "k", "done.bin"), b"finished by an earlier attempt")
    with store.writer("demo", "k", config={}, code_version="1") as w:
        w.adopt("done.bin")
        w.write_bytes("new.bin", b"new")
        w.commit()
    names = [p.rsplit("/", 1)[-1] for p in store.fs.find(store.path("demo", "k"))]
    assert not any(TMP_MARKER in n for n in names)
    assert store.open("demo", "k", verify="sha256").files() == ["done.bin", "new.bin"]


def test_stage_key_is_canonical_and_sensitive() -> None:
    base = stage_key("s", "1", {"a": 1, "b": [1, 2]}, {"x": "k1", "y": "k2"})
    assert base == stage_key("s", "1", {"b": [1, 2], "a": 1}, {"y": "k2", "x": "k1"})
    assert len(base) == 64
    for other in (
        stage_key("t", "1", {"a": 1, "b": [1, 2]}, {"x": "k1", "y": "k2"}),
        stage_key("s", "2", {"a": 1, "b": [1, 2]}, {"x": "k1", "y": "k2"}),
        stage_key("s", "1", {"a": 2, "b": [1, 2]}, {"x": "k1", "y": "k2"}),
        stage_key("s", "1", {"a": 1, "b": [1, 2]}, {"x": "k1", "y": "k3"}),
    ):
        assert other != base


@pytest.mark.parametrize("backend", ["file", "gs"])
def test_sigkill_mid_artifact_leaves_no_manifest_and_rerun_commits(backend: str, tmp_path: Path, request) -> None:
    if backend == "gs":
        request.getfixturevalue("gcs_emulator")
        root = f"gs://llm-trm-test/kill-{tmp_path.name}"
    else:
        root = f"file://{tmp_path / 'store'}"
    cmd = [sys.executable, "-m", "tests.helpers.slow_writer", root, "k"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([*cmd, "slow"], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == "WRITING", f"writer did not start: {line!r}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    store = ArtifactStore(root)
    assert not store.is_committed("demo", "k")
    assert store.read_manifest("demo", "k") is None
    with pytest.raises(ArtifactNotCommittedError, match="interrupted"):
        store.open("demo", "k")

    done = subprocess.run([*cmd, "fast"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    art = store.open("demo", "k", verify="sha256")
    assert art.manifest.files["second.bin"].size == 8 * 256 * 1024
    names = [p.rsplit("/", 1)[-1] for p in store.fs.find(store.path("demo", "k"))]
    assert not any(TMP_MARKER in n for n in names), names


def test_storage_failures_become_clear_transient_errors(monkeypatch) -> None:
    from llm_trm_core.errors import TransientError
    from tasks.retry import is_transient

    store = ArtifactStore("memory://unreachable")

    def refuse(*args, **kwargs):
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(store.fs, "open", refuse)
    monkeypatch.setattr(store.fs, "exists", refuse)
    with pytest.raises(TransientError, match="cannot reach the artifact store memory:///unreachable") as info:
        store.read_manifest("demo", "k")
    assert is_transient(info.value)  # Prefect retries it
    with pytest.raises(TransientError, match="STORAGE_EMULATOR_HOST"):
        store.is_committed("demo", "k")

    def forbid(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(store.fs, "open", forbid)
    with pytest.raises(ArtifactError, match="no permission on the artifact store"):
        store.read_manifest("demo", "k")

"""Store and model problems are one line naming the fix, exit code 2, before Prefect starts.

Real parts only: the real filesystem (a path under a regular file, an immutable folder via
`chattr +i`, a read-only bind mount; both stop root, unlike chmod), the GCS emulator for a missing
bucket, the CLI as a subprocess. GCS's 401/403 answers come from a local HTTP endpoint that answers
as GCS does (the emulator accepts every caller, so it cannot produce them).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import fsspec
import pytest

from llm_trm_core.config import ModelConfig, RuntimeConfig, load_config
from llm_trm_core.errors import HubUnavailableError, UserError
from llm_trm_core.preflight import (
    PROBE_PREFIX,
    ModelSourceError,
    StoreUnusableError,
    _local_failure,
    check_hub_model,
    check_model,
    check_model_folder,
    check_store,
)
from tests.conftest import GCS_BUCKET, REPO

# With this, a command that got past the preflight would fail on the Prefect server instead: every
# store and model test below therefore also proves that the preflight ran before Prefect started.
NO_PREFECT = {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "0"}


def _cli(*args: str, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess[str], float]:
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )
    return result, time.perf_counter() - start


def _one_error_line(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """Exit code 2, no traceback, and stderr is exactly one `error:` line holding every fragment and a fix."""
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("error: ") and "Fix:" in line, line
    for fragment in fragments:
        assert fragment in line, line
    return line


# -- store, through the CLI --------------------------------------------------------------------


def test_cli_store_under_a_regular_file(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result, seconds = _cli("pipeline", "--preset", "tiny", "--store", f"file://{blocker}/store", env=NO_PREFECT)
    _one_error_line(result, f"store file://{blocker}/store", f"under {blocker}, which is a regular file")
    assert seconds < 30, seconds  # no Prefect start (about a second when the machine is idle)


def test_cli_preflight_runs_before_prefect_or_torch_is_imported(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code = (
        "import sys\n"
        "from flows.cli import main\n"
        f"sys.argv = ['llm-trm', 'trm', '--preset', 'tiny', '--store', 'file://{blocker}']\n"
        "try:\n"
        "    main()\n"
        "except SystemExit as exc:\n"
        "    heavy = [m for m in ('prefect', 'torch', 'transformers') if m in sys.modules]\n"
        "    print('exit', exc.code, 'loaded', heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "exit 2 loaded []", result.stdout + result.stderr
    assert "is a regular file" in result.stderr


def test_cli_store_in_an_immutable_folder(tmp_path: Path) -> None:
    folder = tmp_path / "immutable"
    folder.mkdir()
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here (not root, or a file system without the flag)")
    try:
        result, _ = _cli("compressor", "--preset", "tiny", "--store", f"file://{folder}", env=NO_PREFECT)
        _one_error_line(result, f"store file://{folder}", "immutable", f"chattr -i {folder}")
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_cli_store_on_a_read_only_mount(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    mounted = subprocess.run(["mount", "--bind", "-o", "ro", str(folder), str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot bind-mount read-only here: {mounted.stderr.decode().strip()}")
    try:
        result, _ = _cli("pipeline", "--preset", "tiny", "--store", f"file://{folder}/store", env=NO_PREFECT)
        _one_error_line(result, f"store file://{folder}/store", f"{folder} is on a read-only file system")
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_cli_store_in_a_missing_gcs_bucket(gcs_emulator: str) -> None:
    bucket = f"no-such-bucket-{uuid.uuid4().hex[:8]}"
    result, _ = _cli("pipeline", "--preset", "tiny", "--store", f"gs://{bucket}/llm-trm", env=NO_PREFECT)
    _one_error_line(result, f"store gs://{bucket}/llm-trm", f"the bucket gs://{bucket} does not exist", "create it")


def test_cli_model_folder_that_does_not_exist(tmp_path: Path) -> None:
    missing = tmp_path / "no-model"
    result, _ = _cli(
        "datagen",
        "--preset",
        "tiny",
        "--store",
        f"file://{tmp_path / 'store'}",
        "model.source=folder",
        f"model.name_or_path={missing}",
        env=NO_PREFECT,
    )
    _one_error_line(result, f"model folder {missing} (model.source=folder) does not exist", "save_pretrained")


def test_cli_prefect_server_that_does_not_start_in_time(tmp_path: Path) -> None:
    """Timeout 0: Prefect gives up before its first health check answers, as on a machine too busy to start it."""
    result, _ = _cli("pipeline", "--preset", "tiny", "--store", f"file://{tmp_path / 'store'}", env=NO_PREFECT)
    line = _one_error_line(
        result,
        "the temporary Prefect API server did not answer within 0 s",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=600",
        "PREFECT_API_URL=",
    )
    assert "prefect server start" in line


# -- store, in process ---------------------------------------------------------------------------


def test_a_folder_this_user_may_not_write(tmp_path: Path) -> None:
    folder = tmp_path / "r555"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if os.geteuid() != 0:
            with pytest.raises(StoreUnusableError) as info:
                check_store(f"file://{folder}")
            message = str(info.value)
        else:  # chmod does not stop root: check the wording of the EACCES a user would get
            denied = PermissionError(errno.EACCES, "Permission denied", str(folder / f"{PROBE_PREFIX}x"))
            message = _local_failure(f"file://{folder}", folder, denied)
    finally:
        folder.chmod(0o755)
    assert message.startswith(
        f"store file://{folder}: {folder} is not writable by this user (permission denied). Fix: make it "
        f"writable (chown or chmod u+w {folder}), or choose another --store"
    ), message


def test_a_usable_store_passes_and_keeps_no_probe(store_root: str) -> None:
    check_store(store_root)
    fs, base = fsspec.core.url_to_fs(store_root)
    fs.invalidate_cache()
    assert not [p for p in fs.find(base) if PROBE_PREFIX in str(p)]


def test_an_unreachable_gcs_endpoint_fails_in_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
    start = time.perf_counter()
    with pytest.raises(StoreUnusableError) as info:
        check_store(f"gs://{GCS_BUCKET}/x")
    assert time.perf_counter() - start < 10  # gcsfs alone retries for ~30 s
    assert f"cannot reach the GCS endpoint http://127.0.0.1:{port}" in str(info.value)
    assert "STORAGE_EMULATOR_HOST" in str(info.value) and "\n" not in str(info.value)


@pytest.fixture()
def refusing_gcs(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[int, str], None]]:
    """An endpoint that answers every request with one HTTP error, as GCS does for bad credentials."""
    answer = {"status": 401, "message": ""}

    class Handler(BaseHTTPRequestHandler):
        def _refuse(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            body = json.dumps({"error": {"code": answer["status"], "message": answer["message"]}}).encode()
            self.send_response(int(answer["status"]))
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = do_DELETE = _refuse

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{server.server_address[1]}")

    def set_answer(status: int, message: str) -> None:
        answer.update(status=status, message=message)

    try:
        yield set_answer
    finally:
        server.shutdown()
        server.server_close()


def test_gcs_credentials_refused_name_the_fix(refusing_gcs: Callable[[int, str], None]) -> None:
    refusing_gcs(
        401, "Anonymous caller does not have storage.objects.create access to the Google Cloud Storage object."
    )
    with pytest.raises(StoreUnusableError) as info:
        check_store("gs://private-bucket/llm-trm")
    message = str(info.value)
    assert "store gs://private-bucket/llm-trm: the request was not authenticated (HTTP 401" in message
    assert "GOOGLE_APPLICATION_CREDENTIALS" in message and "\n" not in message

    refusing_gcs(403, "robot@project.iam.gserviceaccount.com does not have storage.objects.create access.")
    with pytest.raises(StoreUnusableError) as info:
        check_store("gs://private-bucket/llm-trm")
    message = str(info.value)
    assert "the credentials in use may not write to gs://private-bucket (HTTP 403" in message
    assert "roles/storage.objectAdmin" in message and "\n" not in message


# -- model -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from llm_trm_core.lm import load_language_model

    cfg = load_config("tiny")
    lm = load_language_model(cfg.model, cfg.runtime)
    folder = tmp_path_factory.mktemp("saved-model")
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return folder


def _truncate(folder: Path) -> None:
    weights = folder / "model.safetensors"
    with weights.open("r+b") as f:
        f.truncate(weights.stat().st_size // 2)


def _drop(*names: str) -> Callable[[Path], None]:
    def drop(folder: Path) -> None:
        for name in names:
            (folder / name).unlink()

    return drop


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda f: shutil.rmtree(f), "does not exist"),
        (lambda f: (shutil.rmtree(f), f.write_text("x")), "is a file, not a folder"),
        (lambda f: (shutil.rmtree(f), f.mkdir()), "is empty"),
        (_drop("config.json"), "has no config.json"),
        (lambda f: (f / "config.json").write_text("{not json"), "has an unreadable config.json"),
        (_drop("model.safetensors"), "has no weights (model.safetensors"),
        (_truncate, "has a truncated weights file model.safetensors"),
        (_drop("tokenizer.json"), "has no tokenizer (tokenizer.json, tokenizer.model"),
        (_drop("config.json", "tokenizer.json"), "has no config.json; has no tokenizer"),
    ],
    ids=["missing", "file", "empty", "no-config", "bad-config", "no-weights", "truncated", "no-tokenizer", "two"],
)
def test_model_folder_problems_are_one_line_naming_the_fix(
    saved_model: Path, tmp_path: Path, damage: Callable[[Path], object], expected: str
) -> None:
    folder = tmp_path / "model"
    shutil.copytree(saved_model, folder)
    check_model_folder(str(folder))  # whole: passes
    damage(folder)
    with pytest.raises(ModelSourceError) as info:
        check_model(ModelConfig(source="folder", name_or_path=str(folder)))
    message = str(info.value)
    assert message.startswith(f"model folder {folder} (model.source=folder) {expected}"), message
    assert "Fix: point model.name_or_path at a complete save_pretrained folder" in message and "\n" not in message


def test_a_hub_id_offline_is_one_line_unless_it_is_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    assert os.environ["HF_HUB_OFFLINE"] == "1"  # set by the test session
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    start = time.perf_counter()
    with pytest.raises(HubUnavailableError) as info:
        check_model(ModelConfig(source="hub", name_or_path="HuggingFaceTB/SmolLM3-3B"))
    assert time.perf_counter() - start < 2
    message = str(info.value)
    assert message.startswith(
        "model HuggingFaceTB/SmolLM3-3B (model.source=hub): HF_HUB_OFFLINE is set and the model is not in "
        "the local Hugging Face cache. Fix:"
    ), message
    assert "--preset local" in message and "model.source=folder" in message and "\n" not in message

    # The same id, once in the local hub cache, passes offline (loading then uses local files only).
    repo = tmp_path / "hub" / "models--HuggingFaceTB--SmolLM3-3B"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (repo / "snapshots" / ("0" * 40) / "config.json").write_text("{}")
    check_hub_model("HuggingFaceTB/SmolLM3-3B", None)


def test_flow_guard_runs_the_preflight(tmp_path: Path) -> None:
    """What a run submitted from the UI or a deployment enters first (no server needed to fail here)."""
    from tasks.attempts import flow_guard

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cfg = load_config("tiny", [f"store.root=file://{blocker}/store"])
    with pytest.raises(StoreUnusableError, match="which is a regular file, not a folder"), flow_guard(cfg):
        pytest.fail("the flow body ran on an unusable store")
    cfg = load_config("tiny", [f"store.root=file://{tmp_path}/store", "model.source=folder", "model.name_or_path=/x"])
    with pytest.raises(UserError, match=r"model folder /x \(model.source=folder\) does not exist"), flow_guard(cfg):
        pytest.fail("the flow body ran without its model")


def test_smollm2_cache_preflight_needs_a_writable_cache(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ModelSourceError) as info:
        check_model(ModelConfig(source="smollm2-gguf"), RuntimeConfig(cache_dir=str(blocker / "cache")))
    message = str(info.value)
    assert message.startswith(f"model.source=smollm2-gguf: the converted-model cache {blocker}/cache/models is not")
    assert "LLM_TRM_CACHE_DIR" in message and "\n" not in message
    check_model(ModelConfig(source="smollm2-gguf"), RuntimeConfig(cache_dir=str(tmp_path / "cache")))  # converts later


@pytest.mark.usefixtures("prefect_server")
def test_a_flow_run_on_an_unusable_store_fails_with_the_one_line_message(tmp_path: Path) -> None:
    """As a run submitted from the UI: the flow run ends Failed, its message the preflight's line, no task run."""
    from flows.pipeline import pipeline

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    state = pipeline(load_config("tiny", [f"store.root=file://{blocker}/store"]), return_state=True)
    assert state.is_failed()
    with pytest.raises(StoreUnusableError, match="which is a regular file, not a folder. Fix:"):
        state.result()
    assert "which is a regular file" in (state.message or "")

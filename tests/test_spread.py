"""The generation work over this machine's processes (llm_trm_core/stages/spread.py): `runtime.generation_processes`
torchrun ranks (gloo/CPU here, one per GPU on CUDA), each committing its share of the units; the caller then
assembles artifacts identical (sha256) to a one-process run's, and a rank killed mid-way fails the launch with
one error line while a rerun computes only the units not committed."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from llm_trm_core.config import load_config
from llm_trm_core.errors import ConfigError, UserError
from llm_trm_core.store import ArtifactStore
from tests.helpers.stage_cli import file_digests, run_stage

TWO = "runtime.generation_processes=2"
UNITS = "compressor.hidden_unit_sequences=64"  # the tiny corpus's 359 sequences: 6 units


# -- the setting ---------------------------------------------------------------------------------


def test_auto_is_every_cuda_device_and_one_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from llm_trm_core.launch import generation_processes

    assert load_config("tiny").runtime.generation_processes == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert generation_processes(load_config("tiny").runtime) == 1  # CPU: nothing changes
    assert generation_processes(load_config("tiny", [TWO]).runtime) == 2  # CPU processes when asked
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert generation_processes(load_config("tiny").runtime) == 4
    assert generation_processes(load_config("tiny", ["runtime.device=cpu"]).runtime) == 1
    assert generation_processes(load_config("tiny", [TWO]).runtime) == 2
    with pytest.raises(ConfigError, match=r"generation_processes=8 but this process sees 4 CUDA device"):
        generation_processes(load_config("tiny", ["runtime.generation_processes=8"]).runtime)


def test_preflight_refuses_more_processes_than_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from llm_trm_core.config import RuntimeConfig
    from llm_trm_core.preflight import check_runtime

    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_runtime(RuntimeConfig(device="cuda"))  # auto: both GPUs
    check_runtime(RuntimeConfig(device="cuda", generation_processes=2))
    with pytest.raises(ConfigError, match="generation_processes=3 but this process sees 2 CUDA device"):
        check_runtime(RuntimeConfig(device="cuda", generation_processes=3))


@pytest.mark.parametrize("value", ["0", "-1", "many", "1.5"])
def test_a_bad_count_is_one_config_error(value: str) -> None:
    with pytest.raises(ConfigError, match="generation_processes"):
        load_config("tiny", [f"runtime.generation_processes={value}"])


def test_the_count_is_not_part_of_any_key() -> None:
    from llm_trm_core.stages.keys import key_for

    for stage in ("hiddens", "problems"):
        assert key_for(load_config("tiny", [TWO]), stage) == key_for(load_config("tiny"), stage)


def test_ranks_share_the_units_out_in_turn() -> None:
    from llm_trm_core.launch import share_of

    shares = [share_of(range(2, 9), (rank, 3)) for rank in range(3)]
    assert shares == [[2, 5, 8], [3, 6], [4, 7]]
    assert share_of(range(1), (1, 2)) == []  # more ranks than units
    with pytest.raises(UserError, match="rank 2 of 2 does not exist"):
        share_of(range(4), (2, 2))


def test_listing_a_commands_stages_launches_nothing(tmp_path: Path) -> None:
    """The graph spreads only for a call that runs the stages (the Prefect call, `plain_call`): recording
    the stages a command runs (`stages_of`, stand-in manifests) starts no process."""
    from llm_trm_core.stages.graph import stages_of

    cfg = load_config("tiny", [f"store.root=file://{tmp_path}", TWO])
    assert {"hiddens", "datagen-shard", "evaluate"} <= set(stages_of(cfg, "pipeline"))
    assert not (tmp_path / "hiddens").exists()


def test_a_failed_worker_is_named_in_one_line() -> None:
    from llm_trm_core.launch import failure_summary

    def worker(rank: int, pid: int, number: int, name: str) -> str:  # one worker in torchrun's summary
        return f"""[0]:
      time      : 2026-12-02_15:40:00
      host      : box
      rank      : {rank} (local_rank: {rank})
      exitcode  : -{number} (pid: {pid})  ({name})
      error_file: <N/A>
      traceback : Signal {number} ({name}) received by PID {pid}"""

    torchrun = f"""error: the store is gone
    torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
    ============================================================
    flows.cli FAILED
    ------------------------------------------------------------
    Failures:
    {worker(0, 4241, 15, "SIGTERM")}
    ------------------------------------------------------------
    Root Cause (first observed failure):
    {worker(1, 4242, 9, "SIGKILL")}
    ============================================================"""
    line = failure_summary(torchrun.splitlines())
    assert "\n" not in line
    assert line.startswith("rank 1 (local_rank: 1) failed first: exitcode -9 (pid: 4242) (SIGKILL);")
    assert line.endswith("it said error: the store is gone")
    assert failure_summary(["nothing useful"]) == ""


# -- real processes: torchrun ranks on CPU --------------------------------------------------------


@pytest.mark.slow
def test_datagen_shards_on_two_processes_are_the_bytes_of_one(tmp_path: Path) -> None:
    """Datagen shards on 2 torchrun ranks (shards 0 and 2 on rank 0, 1 on rank 1): the shards and the report
    have the keys and sha256 of a one-process run's."""
    one = run_stage("datagen", tmp_path / "one")
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_stage("datagen", tmp_path / "two", TWO)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "shards 0..2 on 2 local processes" in two.stderr
    stages = ("datagen-shard", "datagen")
    reference = file_digests(tmp_path / "one", *stages)
    assert len(reference) == 4 and file_digests(tmp_path / "two", *stages) == reference  # 3 shards + the report


def test_a_rank_killed_mid_way_fails_in_one_line_and_the_rerun_computes_only_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Corpus hidden-state units on 2 torchrun ranks (units 1, 3, 5 on rank 0; 2, 4, 6 on rank 1), rank 1
    SIGKILLed after its first unit: the launch fails with one error line naming it; the rerun computes exactly
    the units not committed, and the `hiddens` stage then writes the artifact (key, sha256) of a one-process
    run."""
    from llm_trm_core.stages.compressor import run_corpus_hiddens
    from llm_trm_core.stages.keys import key_for
    from llm_trm_core.stages.spread import spread_hiddens
    from llm_trm_core.training.checkpoints import CheckpointManager

    caplog.set_level("INFO")
    one = load_config("tiny", [f"store.root=file://{tmp_path / 'one'}", UNITS])
    reference = run_corpus_hiddens(one, ArtifactStore(one.store.root))
    cfg = load_config("tiny", [f"store.root=file://{tmp_path / 'two'}", UNITS, TWO])
    store = ArtifactStore(cfg.store.root)
    monkeypatch.setenv("LLM_TRM_FAULT_KILL", "hiddens-checkpoint:2")  # in the ranks: rank 1's first unit
    with pytest.raises(UserError) as failed:
        spread_hiddens(cfg)
    message = str(failed.value)
    assert "\n" not in message and "rank 1 (local_rank: 1) failed first" in message and "SIGKILL" in message
    assert store.read_manifest("hiddens", reference.key) is None
    kept = set(CheckpointManager(store, "hiddens", key_for(cfg, "hiddens")).complete_steps())
    assert 2 in kept and len(kept) < 6

    monkeypatch.delenv("LLM_TRM_FAULT_KILL")
    caplog.clear()
    assert spread_hiddens(cfg) == {"kind": "hiddens", "processes": 2, "part": 0}
    computed = {int(n) for n in re.findall(r"hidden states: unit (\d+) of 6 committed", caplog.text)}
    assert computed == set(range(1, 7)) - kept, caplog.text[-3000:]
    caplog.clear()
    assert run_corpus_hiddens(cfg, store).key == reference.key  # every unit found committed: replayed
    assert "6 of 6 units committed already" in caplog.text and "unit 1 of 6 committed" not in caplog.text
    digests = file_digests(tmp_path / "two", "hiddens")
    assert len(digests) == 1 and digests == file_digests(tmp_path / "one", "hiddens")
    assert spread_hiddens(cfg) is None  # committed: nothing launched


@pytest.mark.slow
def test_evaluation_chunks_on_two_processes_equal_one_process(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The evaluation's chunks decoded by 2 torchrun ranks: the evaluate stage finds them all committed and
    its answers (apart from timings) and metrics equal a one-process evaluation's."""
    import json
    import shutil

    from llm_trm_core.stages.graph import run_plain

    overrides = ["evaluate.batch_size=2"]
    cfg = load_config("tiny", [f"store.root=file://{tmp_path / 'two'}", *overrides])
    run_plain(cfg, "latent")
    shutil.copytree(tmp_path / "two", tmp_path / "one")
    caplog.set_level("INFO")
    two = run_plain(load_config("tiny", [f"store.root=file://{tmp_path / 'two'}", TWO, *overrides]), "evaluate")
    one = run_plain(load_config("tiny", [f"store.root=file://{tmp_path / 'one'}", *overrides]), "evaluate")
    assert "evaluation chunks 0..3 on 2 local processes" in caplog.text
    assert two["evaluate"]["key"] == one["evaluate"]["key"]

    def untimed(root: Path) -> Any:
        store = ArtifactStore(f"file://{root}")
        answers = json.loads(store.open("evaluate", one["evaluate"]["key"]).read_bytes("answers.json"))
        return {arm: [{k: v for k, v in r.items() if k != "seconds"} for r in rows] for arm, rows in answers.items()}

    assert untimed(tmp_path / "two") == untimed(tmp_path / "one")

    def untimed_rows(result: dict[str, Any]) -> Any:
        return [{k: v for k, v in row.items() if "seconds" not in k} for row in result["evaluate"]["metrics"]["rows"]]

    assert untimed_rows(two) == untimed_rows(one)

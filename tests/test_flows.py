"""The pipeline flow and the CLI against a real Prefect server (temporary SQLite database)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from llm_trm_core.config import load_config
from llm_trm_core.data.problems import read_problems
from llm_trm_core.store import ArtifactStore

runner = CliRunner()


def test_cli_config_prints_the_resolved_config() -> None:
    result = runner.invoke(app, ["config", "--preset", "tiny", "compressor.d_prime=24", "--store", "memory://x"])
    assert result.exit_code == 0, result.output
    assert "d_prime: 24" in result.output and "root: memory://x" in result.output


def test_cli_rejects_bad_config_with_exit_code_2() -> None:
    result = runner.invoke(app, ["config", "--preset", "tiny", "compressor.d_primee=24"])
    assert result.exit_code == 2
    assert "unknown key 'compressor.d_primee'" in result.output and "d_prime" in result.output


def test_cli_help_everywhere() -> None:
    assert runner.invoke(app, ["--help"]).exit_code == 0
    commands = ["pipeline", "config", "compressor", "datagen", "pairs", "trm", "latent", "evaluate", "grpo", "sweep"]
    for command in commands:
        result = runner.invoke(app, [command, "--help"])
        assert result.exit_code == 0 and "--preset" in result.output, command


@pytest.mark.usefixtures("prefect_server")
def test_pipeline_flow_commits_then_hits_the_cache_and_logs_to_prefect(tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    from flows.pipeline import pipeline

    cfg = load_config("tiny", [f"store.root=file://{tmp_path / 'store'}"])
    state = pipeline(cfg, return_state=True)
    first = state.result()
    manifest = first["problems"]
    store = ArtifactStore(cfg.store.root)
    problems = read_problems(store, store.read_manifest("problems", manifest["key"]))
    assert len(problems.problems) == manifest["metrics"]["total"] > 0

    assert list(first) == [
        "problems", "hiddens", "basis", "compressor-1a", "datagen", "trace-hiddens", "trace-basis", "compressor-1b",
        "pairs", "trm", "latent", "evaluate-before", "grpo-problems", "grpo", "evaluate",
    ]  # fmt: skip
    assert first["grpo"]["upstream"]["latent"] == first["latent"]["key"]
    assert first["evaluate"]["upstream"]["grpo"] == first["grpo"]["key"]
    assert first["evaluate"]["upstream"]["before"] == first["evaluate-before"]["key"]
    assert first["trm"]["upstream"] == {"pairs": first["pairs"]["key"]}
    assert first["compressor-1b"]["upstream"]["init"] == first["compressor-1a"]["key"]
    assert first["pairs"]["upstream"] == {
        "datagen": first["datagen"]["key"],
        "compressor": first["compressor-1b"]["key"],
    }

    second = pipeline(cfg)
    assert second == first  # every stage came back from the store, nothing was recomputed

    APILogHandler().flush()
    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        artifacts = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    core_logs = [log for log in logs if log.name.startswith("llm_trm_core")]
    assert any("committed" in log.message for log in core_logs), [log.message for log in logs]
    assert {a.key for a in artifacts} >= {
        "problems-metrics", "problems-artifact", "datagen-artifact", "pairs-metrics", "trm-report", "trm-comparison",
        "latent-artifact", "evaluate-accuracy-before-grpo", "evaluate-accuracy-after-grpo",
        "evaluate-before-after-grpo", "grpo-heldout-before-after", "grpo-steps", "grpo-artifact",
    }  # fmt: skip


@pytest.mark.usefixtures("prefect_server")
def test_cli_pipeline_prints_key_uri_and_metrics(tmp_path: Path) -> None:
    root = f"file://{tmp_path / 'store'}"
    result = runner.invoke(app, ["pipeline", "--preset", "tiny", "--store", root])
    assert result.exit_code == 0, result.output
    assert re.search(r"problems\s+key=[0-9a-f]{16}", result.output)
    assert re.search(r"pairs\s+key=[0-9a-f]{64}", result.output)
    assert f"uri: {root}/problems/" in result.output
    assert "n_train" in result.output
    assert "end-task accuracy" in result.output and "random_latent" in result.output
    assert "before vs after GRPO" in result.output and "reward rate" in result.output


@pytest.mark.usefixtures("prefect_server")
def test_sweep_flow_compares_solvers_and_publishes_a_report(tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.compressor import sweep_flow

    cfg = load_config("tiny", [f"store.root=file://{tmp_path / 'store'}", "sweep.d_primes=[8, 16, 64, 100]"])
    result = sweep_flow(cfg)
    rows = result["sweep"]["metrics"]["rows"]
    assert sorted((r["d_prime"], r["solver"]) for r in rows) == [
        (8, "closed_form"), (8, "sgd"), (16, "closed_form"), (16, "sgd"),
    ]  # fmt: skip
    by = {(r["d_prime"], r["solver"]): r for r in rows}
    for d in (8, 16):  # the exact solution is at least as good as SGD on held-out data
        assert by[(d, "closed_form")]["fvu"] <= by[(d, "sgd")]["fvu"] + 1e-6
    assert by[(16, "closed_form")]["fvu"] < by[(8, "closed_form")]["fvu"]
    store = ArtifactStore(cfg.store.root)
    report = store.open("sweep", result["sweep"]["key"])
    assert report.read_bytes("plot.png")[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| 16 | closed_form |" in report.read_bytes("report.md").decode()

    with get_client(sync_client=True) as client:
        (artifact,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["sweep-artifact"])), limit=1
        )
    assert "data:image/png;base64," in str(artifact.data)

    again = sweep_flow(cfg)
    assert again["sweep"] == result["sweep"]


@pytest.mark.usefixtures("prefect_server")
def test_compressor_flow_and_cli(tmp_path: Path) -> None:
    root = f"file://{tmp_path / 'store'}"
    result = runner.invoke(app, ["compressor", "--preset", "tiny", "--store", root, "compressor.d_prime=12"])
    assert result.exit_code == 0, result.output
    assert "baseline: mean" in result.output and "baseline: random_init" in result.output
    assert re.search(r"compressor-1a\s+key=[0-9a-f]{64}", result.output)
    tuned = runner.invoke(app, ["compressor", "--preset", "tiny", "--store", root, "--phase", "1b"])
    assert tuned.exit_code == 0, tuned.output
    assert "compressor-1b" in tuned.output and "baseline: init_1a" in tuned.output
    bad = runner.invoke(app, ["compressor", "--preset", "tiny", "--store", root, "--phase", "2"])
    assert bad.exit_code == 2 and "--phase must be 1a or 1b" in bad.output
    too_big = runner.invoke(app, ["compressor", "--preset", "tiny", "--store", root, "compressor.d_prime=64"])
    assert too_big.exit_code == 2 and "hidden size D=64" in too_big.output


@pytest.mark.usefixtures("prefect_server")
def test_trm_cli_prints_the_report_beside_baselines(tmp_path: Path) -> None:
    result = runner.invoke(app, ["trm", "--preset", "tiny", "--store", f"file://{tmp_path / 'store'}"])
    assert result.exit_code == 0, result.output
    for row in ("baseline: mean", "baseline: last_pre", "baseline: mean_pool", "baseline: ridge", "baseline: knn"):
        assert row in result.output
    assert "TRM step 3" in result.output and "the best baseline (by R²)" in result.output

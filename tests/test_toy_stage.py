"""A stage declared in one file (tests/toy_stage.py) runs through the CLI, without and with Prefect, and a flow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import add_stage_commands, app
from llm_trm_core.config import load_config
from llm_trm_core.plan import command_stages
from llm_trm_core.stages.declaration import STAGE_MODULES_ENV, stage_of_task
from llm_trm_core.stages.keys import STAGE_CODE_VERSIONS, STAGE_SECTIONS, key_for
from llm_trm_core.store import ArtifactStore
from tests import toy_stage

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def test_the_declaration_is_all_the_keys_and_the_plan_need(tmp_path: Path) -> None:
    assert STAGE_CODE_VERSIONS["toy"] == "1" and STAGE_SECTIONS["toy"] == ("runtime.seed",)
    assert stage_of_task("toy") is toy_stage.TOY
    assert command_stages("toy") == ("problems", "toy")
    cfg = load_config("tiny")
    assert key_for(cfg, "toy", {"problems": "p"}) != key_for(
        load_config("tiny", ["runtime.seed=1"]), "toy", {"problems": "p"}
    )
    assert key_for(cfg, "toy", {"problems": "p"}) == key_for(
        load_config("tiny", ["trm.lr=1"]), "toy", {"problems": "p"}
    )


def test_the_cli_runs_it_without_prefect(tmp_path: Path) -> None:
    root = f"file://{tmp_path / 'store'}"
    result = runner.invoke(app, ["stage", "toy", "--preset", "tiny", "--store", root])
    assert result.exit_code == 0, result.output
    line = json.loads(result.output.strip().splitlines()[-1])
    assert line["stage"] == "toy" and ArtifactStore(root).read_manifest("toy", line["key"]) is not None
    assert {r["split"] for r in line["metrics"]["rows"]} == {"train", "val", "test"}
    bad = runner.invoke(app, ["stage", "no-such-stage", "--preset", "tiny", "--store", root])
    assert bad.exit_code == 2 and "unknown stage or command 'no-such-stage'" in bad.output


def test_a_stage_module_named_in_the_environment_is_a_command(tmp_path: Path) -> None:
    root = f"file://{tmp_path / 'store'}"
    env = {**os.environ, STAGE_MODULES_ENV: "tests.toy_stage", "PYTHONPATH": str(REPO)}
    help_text = subprocess.run(
        [sys.executable, "-m", "flows.cli", "--help"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert help_text.returncode == 0 and "toy" in help_text.stdout, help_text.stderr[-2000:]
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "stage", "toy", "--preset", "tiny", "--store", root],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1])["stage"] == "toy"


@pytest.mark.usefixtures("prefect_server")
def test_the_generated_command_and_the_stage_flow_run_it_on_prefect(tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId

    from flows.pipeline import stage_flow

    root = f"file://{tmp_path / 'store'}"
    add_stage_commands()
    result = runner.invoke(app, ["toy", "--preset", "tiny", "--store", root])
    assert result.exit_code == 0, result.output
    assert "toy  key=" in result.output and "Problems per split, scaled" in result.output

    cfg = load_config("tiny", [f"store.root={root}"])
    state = stage_flow(cfg, "toy", return_state=True)
    out = state.result()
    assert list(out) == ["problems", "toy"] and out["toy"]["upstream"] == {"problems": out["problems"]["key"]}
    assert out["toy"]["key"] in result.output  # the command's run made it; the flow's came from the cache
    run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
        (table,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["toy-counts"])), limit=1
        )
    assert sorted(r.name.rsplit("-", 1)[0] for r in runs) == ["problems", "toy"]
    assert "train" in str(table.data)

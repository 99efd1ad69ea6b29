"""The fan-out of corpus hidden-state parts and evaluation chunk ranges (flows/fanout.py), without a server:
the graph fans out before the stage task that then finds the work committed, each kind's units are runs
of its own deployment with the parameters its flow takes, committed ranges are not submitted, and the
CLI's check looks only at the deployments of the kinds its command runs. tests/test_datagen_fanout.py
covers the shared loop (limit, re-submissions) and a real server."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from llm_trm_core.config import load_config

HIDDENS = "hiddens-parts/hiddens-parts-local"
EVALUATE = "evaluate-chunks/evaluate-chunks-local"


class _Recorder:
    """A graph call that records the tasks it is asked for and the fan-outs (nothing runs)."""

    def __init__(self) -> None:
        self.calls: list[Any] = []

    def __call__(self, task: str, cfg: Any, /, *inputs: Any, **options: Any) -> dict[str, Any]:
        self.calls.append(task)
        return {"stage": task, "key": task, "uri": "", "upstream": {}, "metrics": {"total": 24, "hidden_size": 64}}

    def fan_out_hiddens(self, cfg: Any, parts: int) -> None:
        self.calls.append(("fan-out-hiddens", parts))

    def fan_out_evaluation(self, cfg: Any, inputs: dict[str, Any], ranges: list[tuple[int, int]]) -> None:
        self.calls.append(("fan-out-evaluation", sorted(inputs), ranges))


def test_the_graph_fans_hidden_states_and_evaluation_out_before_their_tasks(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import llm_trm_core.stages.graph as graph
    from llm_trm_core.stages.graph import compressor, pipeline

    monkeypatch.setattr(graph, "evaluation_chunk_count", lambda cfg, problems: 5)
    fanned = [f"runtime.fanout_hiddens_deployment={HIDDENS}", f"runtime.fanout_evaluate_deployment={EVALUATE}"]
    cfg = load_config("tiny", [*fanned, "runtime.fanout_workers=2"])
    call = _Recorder()
    compressor(call, cfg)
    assert call.calls == [("fan-out-hiddens", 2), "hiddens", "basis", "compressor"]

    call = _Recorder()
    pipeline(call, cfg)
    policy = ["compressor", "latent", "problems", "trm"]
    fan_outs = [c for c in call.calls if isinstance(c, tuple)]
    assert fan_outs == [
        ("fan-out-hiddens", 2),
        ("fan-out-evaluation", policy, [(0, 2), (2, 5)]),  # before GRPO
        ("fan-out-evaluation", sorted([*policy, "grpo", "before"]), [(0, 2), (2, 5)]),  # after
    ]
    for fan_out, task in zip(fan_outs, ("hiddens", "evaluate-before-grpo", "evaluate-after-grpo"), strict=True):
        assert call.calls[call.calls.index(fan_out) + 1] == task  # the task right after its fan-out

    unset = _Recorder()  # the default: no fan-out, the same tasks
    pipeline(unset, load_config("tiny"))
    assert unset.calls == [c for c in call.calls if not isinstance(c, tuple)]

    def plain(task: str, cfg: Any, /, *inputs: Any, **options: Any) -> dict[str, Any]:
        return _Recorder()(task, cfg)

    compressor(plain, cfg)  # a call without Prefect runs the pass itself, and says so
    assert "runtime.fanout_hiddens_deployment=hiddens-parts/hiddens-parts-local applies to the Prefect" in caplog.text


@pytest.fixture
def submitted(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, dict[str, Any]]]:
    """Unit runs submitted to a stand-in server; every run completes at its first poll."""
    import flows.fanout as fanout

    runs: list[tuple[str, str, dict[str, Any]]] = []

    def run_deployment(name: str, parameters: dict[str, Any], flow_run_name: str, **_: Any) -> Any:
        runs.append((name, flow_run_name, {k: v for k, v in parameters.items() if k != "cfg"}))
        return SimpleNamespace(id=flow_run_name, name=flow_run_name)

    class Client:
        def __enter__(self) -> Client:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

        def read_flow_run(self, run_id: str) -> Any:
            return SimpleNamespace(name=run_id, state=SimpleNamespace(type=SimpleNamespace(value="COMPLETED")))

    monkeypatch.setattr(fanout, "run_deployment", run_deployment)
    monkeypatch.setattr(fanout, "get_client", lambda sync_client: Client())
    monkeypatch.setattr(fanout, "check_deployment", lambda client, name, setting: "llm-trm-local")
    monkeypatch.setattr(fanout, "POLL_SECONDS", 0.0)
    return runs


def test_hidden_state_parts_are_runs_of_their_deployment(submitted: list[Any], tmp_path: Any) -> None:
    from flows.fanout import fan_out_hiddens

    cfg = load_config("tiny", [f"store.root=file://{tmp_path}", f"runtime.fanout_hiddens_deployment={HIDDENS}"])
    fan_out_hiddens(cfg, 3)
    assert submitted == [
        (HIDDENS, f"hiddens-part-{i}-of-3-try1", {"part": i, "parts": 3}) for i in range(3)
    ]  # fmt: skip
    submitted.clear()
    fan_out_hiddens(load_config("tiny", [f"store.root=file://{tmp_path}"]), 3)  # unset: nothing is submitted
    assert submitted == []


def test_evaluation_ranges_not_committed_are_runs_of_their_deployment(
    submitted: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    import flows.fanout as fanout

    monkeypatch.setattr(fanout, "evaluation_committed", lambda cfg, inputs, first, end: first == 2)
    cfg = load_config("tiny", [f"runtime.fanout_evaluate_deployment={EVALUATE}"])
    inputs = {"problems": {"key": "p"}, "compressor": {"key": "c"}, "trm": {"key": "t"}, "latent": {"key": "l"}}
    fanout.fan_out_evaluation(cfg, inputs, [(0, 2), (2, 4), (4, 5)])
    assert submitted == [
        (EVALUATE, "evaluate-chunks-0-1-try1", {"first": 0, "end": 2, **inputs}),
        (EVALUATE, "evaluate-chunks-4-4-try1", {"first": 4, "end": 5, **inputs}),
    ]
    submitted.clear()
    after = {**inputs, "grpo": {"key": "g"}, "before": {"key": "b"}}
    fanout.fan_out_evaluation(cfg, after, [(0, 2)])
    assert submitted == [(EVALUATE, "evaluate-after-grpo-chunks-0-1-try1", {"first": 0, "end": 2, **after})]


def test_the_check_looks_only_at_the_kinds_the_command_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    import flows.fanout as fanout
    from llm_trm_core.plan import command_stages

    checked: list[tuple[str, str]] = []

    class Client:
        def __enter__(self) -> Client:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

    monkeypatch.setattr(fanout, "get_client", lambda sync_client: Client())
    monkeypatch.setattr(fanout, "check_deployment", lambda client, name, setting: checked.append((setting, name)))
    cfg = load_config(
        "tiny",
        [f"runtime.fanout_hiddens_deployment={HIDDENS}", f"runtime.fanout_evaluate_deployment={EVALUATE}",
         "runtime.fanout_deployment=datagen-shards/datagen-shards-local"],
    )  # fmt: skip
    fanout.check_fanout(cfg, command_stages("compressor"))
    assert checked == [("fanout_hiddens_deployment", HIDDENS)]
    checked.clear()
    fanout.check_fanout(cfg, command_stages("evaluate"))
    assert [s for s, _ in checked] == ["fanout_deployment", "fanout_hiddens_deployment", "fanout_evaluate_deployment"]


def test_evaluation_range_runs_commit_their_chunks_and_the_stage_assembles_an_uninterrupted_result(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Range runs (`run_evaluate_chunks`, what an evaluate-chunks run does) decode and commit only their
    chunks, a rerun of a committed range decodes nothing, and the evaluate stage then decodes only the
    rest: its artifact equals that of an evaluation in one run (answers apart from timings)."""
    import json
    import shutil

    from llm_trm_core.errors import UserError
    from llm_trm_core.stages.evaluate import evaluation_chunk_count, run_evaluate, run_evaluate_chunks
    from llm_trm_core.stages.graph import run_plain
    from llm_trm_core.store import ArtifactStore, Manifest
    from llm_trm_core.training.checkpoints import CheckpointManager

    caplog.set_level("INFO")
    cfg = load_config("tiny", [f"store.root=file://{tmp_path / 'ranges'}", "evaluate.batch_size=2"])
    out = run_plain(cfg, "latent")
    policy = [Manifest.model_validate(out[k]) for k in ("problems", "compressor-1b", "trm", "latent")]
    shutil.copytree(tmp_path / "ranges", tmp_path / "whole")
    store = ArtifactStore(cfg.store.root)
    assert evaluation_chunk_count(cfg, store, policy[0]) == 4

    caplog.clear()
    done = run_evaluate_chunks(cfg, store, *policy, 1, 3)
    assert done["chunks"] == [1, 2] and not done["committed"]
    assert "evaluated 2/4 chunks" in caplog.text and "evaluated 1/4 chunks" not in caplog.text
    checkpoints = CheckpointManager(store, "evaluate", done["key"])
    assert checkpoints.complete_steps() == [2, 3]
    caplog.clear()
    run_evaluate_chunks(cfg, store, *policy, 1, 3)  # committed already: nothing decoded
    assert "resuming after 2/4 committed chunks" in caplog.text and "evaluated" not in caplog.text
    with pytest.raises(UserError, match=r"chunk range 3\.\.8 is outside this evaluation's chunks 0\.\.3"):
        run_evaluate_chunks(cfg, store, *policy, 3, 9)

    caplog.clear()
    assembled = run_evaluate(cfg, store, *policy)
    assert "resuming after 2/4 committed chunks" in caplog.text
    assert "evaluated 1/4 chunks" in caplog.text and "evaluated 2/4 chunks" not in caplog.text
    assert not checkpoints.complete_steps()  # cleared after the commit
    assert run_evaluate_chunks(cfg, store, *policy, 0, 1)["committed"]

    whole_cfg = load_config("tiny", [f"store.root=file://{tmp_path / 'whole'}", "evaluate.batch_size=2"])
    whole_store = ArtifactStore(whole_cfg.store.root)
    whole = run_evaluate(whole_cfg, whole_store, *policy)
    assert whole.key == assembled.key and whole.metrics["n"] == assembled.metrics["n"]

    def untimed(s: ArtifactStore) -> Any:
        answers = json.loads(s.open("evaluate", whole.key).read_bytes("answers.json"))
        return {arm: [{k: v for k, v in r.items() if k != "seconds"} for r in rows] for arm, rows in answers.items()}

    assert untimed(store) == untimed(whole_store)


def test_every_unit_flow_is_deployed_locally_and_on_the_gpu_pool_with_a_queueing_limit() -> None:
    import yaml

    from tests.test_packaging import REPO

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    by_entrypoint: dict[str, list[dict[str, Any]]] = {}
    for deployment in spec["deployments"]:
        by_entrypoint.setdefault(deployment["entrypoint"], []).append(deployment)
    for flow, name in [("flows/datagen_fanout.py:datagen_shards_flow", "datagen-shards"),
                       ("flows/fanout.py:hidden_parts_flow", "hiddens-parts"),
                       ("flows/fanout.py:evaluate_chunks_flow", "evaluate-chunks")]:  # fmt: skip
        deployments = {d["name"]: d for d in by_entrypoint[flow]}
        assert set(deployments) == {f"{name}-local", f"{name}-smollm3-gpu"}, flow
        gpu = deployments[f"{name}-smollm3-gpu"]
        assert gpu["work_pool"]["name"] == "llm-trm-gpu" and gpu["parameters"]["cfg"]["preset"] == "smollm3-3b"
        assert gpu["concurrency_limit"]["collision_strategy"] == "ENQUEUE" and gpu["concurrency_limit"]["limit"] >= 1

"""The CLI prints every command's results one way: each stage as its declared report, in graph order
(flows/cli.py `print_results`), without Prefect or a model: the manifests here are made up."""

from __future__ import annotations

from typing import Any

from flows.cli import console, print_results


def _manifest(stage: str, metrics: dict[str, Any], upstream: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "stage": stage, "key": f"{stage}-key", "uri": f"memory://s/{stage}/{stage}-key", "code_version": "1",
        "config": {}, "upstream": upstream or {}, "files": {}, "metrics": metrics, "package_version": "0",
        "git_sha": None, "created_at": "t", "completed_at": "t", "manifest_sha256": "0",
    }  # fmt: skip


ACCURACY = [{"arm": "random_latent", "accuracy": 0.25, "ci_low": 0.1, "ci_high": 0.5, "n": 8}]
CHANGE = [{"arm": "trm_latent", "before": 0.1, "after": 0.2, "change": 0.1, "n": 8}]
RESULTS = {
    "problems": _manifest("problems", {"n_train": 48, "total": 64}),
    "trm": _manifest(
        "trm",
        {
            "baselines": {"mean": {"mse": 1.0, "r2": 0.0}, "ridge": {"mse": 0.5, "r2": 0.5}},
            "per_step": [{"step": s, "mse": 1.0 / s, "r2": 0.1 * s} for s in (1, 2, 3)],
            "pairs": {"test": 4},
            "beats_best_baseline": False,
        },
    ),
    "evaluate-before": _manifest("evaluate", {"rows": ACCURACY, "n": 8}),
    "grpo": _manifest(
        "grpo",
        {
            "history": [{"step": 1, "reward_mean": 0.0, "secret_step_metric": 7}],
            "reward_rate": 0.25,
            "reward_first_quarter": 0.0,
            "reward_last_quarter": 0.5,
            "skipped_fraction": 0.5,
            "resumed_from": None,
            "heldout": CHANGE,
            "heldout_problems": 6,
            "problem_source": "arithmetic",
        },
    ),
    "evaluate": _manifest("evaluate", {"rows": ACCURACY, "n": 8, "before_after": CHANGE}, {"grpo": "grpo-key"}),
    "sweep": _manifest("sweep", {"rows": [{"d_prime": 16, "solver": "closed_form", "fvu": 0.4}]}),
}


def test_every_stage_prints_as_its_declared_report_in_graph_order() -> None:
    with console.capture() as captured:
        print_results(RESULTS)
    out = captured.get()
    order = [out.index(f"{label}  key={m['key']}") for label, m in RESULTS.items()]
    assert order == sorted(order)
    assert "n_train" in out and "48" in out  # a stage whose report leaves the metrics to the CLI
    assert "(report.md, per_step.png, model.safetensors)" in out
    assert "baseline: ridge" in out and "TRM step 3" in out and "does NOT beat the best baseline (by R²)" in out
    assert "beats_best_baseline" not in out  # the TRM's report says it: its raw metrics are not dumped
    assert out.count("end-task accuracy (before-grpo)") == 1 and "end-task accuracy (after-grpo)" in out
    assert "random_latent" in out and "before vs after GRPO" in out
    assert "reward rate 0.25 (first quarter 0, last quarter 0.5)" in out and "6 held-out arithmetic" in out
    assert "secret_step_metric" not in out  # GRPO's per-step table is a Prefect artifact only
    assert "Compressor sweep (held-out test)" in out and "closed_form" in out

"""Stage 3 flow: evaluation before GRPO, GRPO on answer correctness, evaluation after (same problems)."""

from __future__ import annotations

from prefect import flow

from flows.chain import Manifests
from flows.latent import through_latent
from llm_trm_core.config import PipelineConfig
from llm_trm_core.stages.grpo import grpo_problem_config
from tasks.attempts import flow_guard
from tasks.caching import cached
from tasks.grpo import grpo_task
from tasks.latent import evaluate_task
from tasks.problems import problems_task


def through_grpo(cfg: PipelineConfig) -> Manifests:
    out = through_latent(cfg)
    shared = (cfg, out["problems"], out["compressor-1b"], out["trm"], out["latent"])
    out["evaluate-before"] = cached(evaluate_task.with_options(name="evaluate-before-grpo"), cfg)(*shared)
    out["grpo-problems"] = cached(problems_task, cfg)(grpo_problem_config(cfg))
    out["grpo"] = cached(grpo_task, cfg)(cfg, out["grpo-problems"], out["compressor-1b"], out["trm"], out["latent"])
    out["evaluate"] = cached(evaluate_task.with_options(name="evaluate-after-grpo"), cfg)(
        *shared, grpo=out["grpo"], before=out["evaluate-before"]
    )
    return out


@flow(name="grpo")
def grpo_flow(cfg: PipelineConfig) -> Manifests:
    """Everything up to the latent policy (cached), evaluation before, GRPO, evaluation after."""
    with flow_guard(cfg, "grpo"):
        return through_grpo(cfg)

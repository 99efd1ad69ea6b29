"""The D' sweep fanned out over workers: one `sweep` deployment run per D', then the full report.

The scheduled sweep deployment runs this flow; each point is a separate flow run of the sweep
deployment restricted to one D' (closed form + SGD), so points spread over the pool and are retried
or resumed on their own, at most `concurrency_limit` at a time (prefect.yaml). When every point has
finished, the report over all D' is made in-process: its compressor tasks come back cached.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from prefect import flow
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment

from flows.chain import Manifests
from flows.compressor import sweep_flow
from llm_trm_core.config import PipelineConfig, keyed_dump
from llm_trm_core.errors import UserError
from tasks.attempts import flow_guard

logger = logging.getLogger(__name__)

FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def point_parameters(cfg: PipelineConfig, d_prime: int) -> dict[str, Any]:
    """A child run's parameters: this config restricted to one D'."""
    dumped = cfg.model_dump(mode="json")
    dumped["sweep"] = {**keyed_dump(cfg.sweep), "d_primes": [d_prime]}
    return {"cfg": dumped}


@flow(name="sweep-fanout")
def sweep_fanout_flow(
    cfg: PipelineConfig, deployment: str = "sweep/sweep-local", poll_seconds: float = 5.0
) -> Manifests:
    """Start one `deployment` run per D' in sweep.d_primes, wait for all, then write the sweep report."""
    with flow_guard(cfg, "sweep"):
        runs: list[FlowRun] = [
            run_deployment(deployment, parameters=point_parameters(cfg, d), timeout=0, as_subflow=True)  # type: ignore[misc]
            for d in cfg.sweep.d_primes
        ]
        logger.info("started %d sweep points on %s", len(runs), deployment)
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            while True:
                states = [client.read_flow_run(r.id).state for r in runs]
                if all(s is not None and s.type.value in FINAL for s in states):
                    break
                time.sleep(poll_seconds)
        failed = [(r.name, s.name) for r, s in zip(runs, states, strict=True) if s and s.type.value != "COMPLETED"]
        if failed:
            raise UserError(f"sweep points did not complete: {failed}; retry them, then re-run the sweep")
    return sweep_flow(cfg)

"""Deploy every deployment in prefect.yaml whose work pool exists; create the local process pool if missing.

    ./run python -m deployments.deploy            # the local pool is created, GPU deployments wait for their pools
    ./run python -m deployments.deploy --list     # what would be deployed and what is skipped, and why
    ./run python -m deployments.deploy --gpu-pools   # also creates the missing GPU pools from their templates

`prefect deploy --all` stops at the first deployment whose pool does not exist (on a CPU-only setup,
the GPU ones); this deploys the others and names, for each skipped one, the pool to create (README,
"GPU workers"). Exit 0 when every deployable deployment was deployed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate

REPO = Path(__file__).resolve().parents[1]
LOCAL_POOL = "llm-trm-local"
# The GPU pools: worker type and base job template (README "GPU workers"; tests/test_job_templates.py).
GPU_POOLS = {
    "llm-trm-gpu": ("docker", "deployments/docker-gpu-job-template.json"),
    "llm-trm-gpu-k8s": ("kubernetes", "deployments/k8s-gpu-job-template.json"),
}
POOL_HINTS = {
    LOCAL_POOL: "python -m deployments.deploy (without --list) creates it as a process pool",
    **{
        name: f"prefect work-pool create {name} --type {kind} --base-job-template {template} "
        f"(its worker needs prefect-{kind}, the `worker` dependency group; README 'GPU workers')"
        for name, (kind, template) in GPU_POOLS.items()
    },
}
logger = logging.getLogger("deploy")


def deployments_by_pool(prefect_yaml: Path) -> dict[str, str]:
    """Deployment name -> its work pool name, as prefect.yaml declares them."""
    data: dict[str, Any] = yaml.safe_load(prefect_yaml.read_text())
    return {d["name"]: d["work_pool"]["name"] for d in data.get("deployments", [])}


def gpu_pool_create(name: str) -> WorkPoolCreate:
    """The GPU pool `name` as GPU_POOLS defines it: its worker type and its base job template."""
    kind, template = GPU_POOLS[name]
    return WorkPoolCreate(name=name, type=kind, base_job_template=json.loads((REPO / template).read_text()))


async def existing_pools(create_local: bool, create_gpu: bool = False) -> set[str]:
    """The work pools that exist, after creating the missing local (and, if asked, GPU) pools. An existing
    pool is left as it is: its template may carry an operator's changes."""
    async with get_client() as client:
        names = {pool.name for pool in await client.read_work_pools()}
        wanted = [WorkPoolCreate(name=LOCAL_POOL, type="process")] if create_local else []
        wanted += [gpu_pool_create(name) for name in GPU_POOLS] if create_gpu else []
        for pool in wanted:
            if pool.name not in names:
                await client.create_work_pool(pool)
                logger.info("created work pool %s (%s)", pool.name, pool.type)
                names.add(pool.name)
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="print the plan and deploy nothing")
    parser.add_argument(
        "--gpu-pools",
        action="store_true",
        help="also create the missing GPU pools (docker, kubernetes) from deployments/*-gpu-job-template.json",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)

    wanted = deployments_by_pool(REPO / "prefect.yaml")
    try:
        pools = asyncio.run(existing_pools(create_local=not args.list, create_gpu=args.gpu_pools and not args.list))
    except (httpx.HTTPError, RuntimeError, OSError) as exc:
        api = os.environ.get("PREFECT_API_URL") or "an ephemeral server (PREFECT_API_URL is unset)"
        logger.error(
            "error: cannot reach the Prefect API at %s (%s). Fix: start `prefect server start` and set "
            "PREFECT_API_URL=http://127.0.0.1:4200/api (prefect config set ...), then deploy again.",
            api,
            str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
        )
        return 2
    ready = [name for name, pool in wanted.items() if pool in pools]
    for name, pool in wanted.items():
        if pool not in pools:
            hint = POOL_HINTS.get(pool, f"prefect work-pool create {pool} --type <type>")
            logger.info("skipped %s: work pool %s does not exist; create it with: %s", name, pool, hint)
    if args.list or not ready:
        logger.info("deployable: %s", ", ".join(ready) or "none")
        return 0
    command = [sys.executable, "-m", "prefect", "--no-prompt", "deploy"]
    for name in ready:
        command += ["--name", name]
    done = subprocess.run(command, cwd=REPO, check=False)
    if done.returncode == 0:
        logger.info("deployed %d deployments: %s", len(ready), ", ".join(ready))
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())

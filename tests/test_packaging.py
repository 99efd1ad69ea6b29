"""Packaging contracts: deployments, Docker overrides and the lock stay consistent with pyproject."""

from __future__ import annotations

import importlib
import json
import tomllib
from pathlib import Path

import yaml

from llm_trm_core.config import PipelineConfig

REPO = Path(__file__).resolve().parent.parent


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_docker_overrides_match_pyproject() -> None:
    lines = (REPO / "deployments" / "overrides.txt").read_text().splitlines()
    docker = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert docker == _pyproject()["tool"]["uv"]["override-dependencies"]


def test_torch_is_pinned_exactly() -> None:
    deps = _pyproject()["project"]["dependencies"]
    assert "torch==2.13.0" in deps
    lock = (REPO / "uv.lock").read_text()
    assert 'name = "torch"\nversion = "2.13.0+cpu"' in lock
    assert "nvidia-cublas" not in lock


def test_prefect_yaml_entrypoints_and_parameters_are_valid() -> None:
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    assert spec["deployments"]
    for deployment in spec["deployments"]:
        path, name = deployment["entrypoint"].split(":")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        flow = getattr(module, name)
        assert flow.name and callable(flow.fn)
        PipelineConfig.model_validate(deployment["parameters"]["cfg"])


def test_deployments_cover_every_flow_gpu_pools_and_the_scheduled_sweep() -> None:
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    by_name = {d["name"]: d for d in spec["deployments"]}
    entrypoints = {d["entrypoint"] for d in spec["deployments"]}
    for module in ("pipeline", "compressor", "datagen", "trm", "latent", "grpo", "sweep_fanout"):
        assert any(e.startswith(f"flows/{module}.py:") for e in entrypoints), module
    assert all("llm-trm" in d["tags"] for d in spec["deployments"])  # the automations match on this tag
    docker = by_name["pipeline-smollm3-gpu"]["work_pool"]
    assert docker["job_variables"]["container_create_kwargs"]["device_requests"][0]["Capabilities"] == [["gpu"]]
    template = json.loads((REPO / "deployments" / "k8s-gpu-job-template.json").read_text())
    container = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpus }}"
    assert by_name["sweep-smollm3-k8s"]["work_pool"]["name"] == "llm-trm-gpu-k8s"
    nightly = by_name["sweep-nightly"]
    assert nightly["schedules"][0]["cron"] and nightly["parameters"]["deployment"] == "sweep/sweep-local"
    assert by_name["sweep-local"]["concurrency_limit"]["limit"] >= 1
    assert all(d["work_pool"]["job_variables"]["env"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] for d in spec["deployments"])


def test_flow_parameters_render_as_a_typed_form() -> None:
    """The UI builds its run form from the parameter schema: the config is a typed, nested object."""
    from flows.pipeline import pipeline

    schema = pipeline.parameters.model_dump()
    cfg = schema["properties"]["cfg"]
    definitions = schema["definitions"]
    ref = cfg.get("$ref") or cfg["allOf"][0]["$ref"]
    config = definitions[ref.rsplit("/", 1)[-1]]
    assert {"model", "compressor", "trm", "grpo", "store"} <= set(config["properties"])
    grpo = definitions["GRPOConfig"]["properties"]
    assert grpo["group_size"]["type"] == "integer" and grpo["loss_type"]["enum"] == ["dapo", "grpo", "dr_grpo"]

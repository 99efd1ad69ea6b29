"""Packaging contracts: deployments, Docker overrides and the lock stay consistent with pyproject."""

from __future__ import annotations

import importlib
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

"""Packaging contracts: deployments, Docker overrides and the lock stay consistent with pyproject."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from llm_trm_core.config import PipelineConfig

REPO = Path(__file__).resolve().parent.parent
WHEELS = "/opt/wheels"  # the dev/CI machines' wheel folder, the `cpu` extra's torch index
PYPI_FILES = "https://files.pythonhosted.org/"


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _uv() -> str:
    uv = REPO / ".tools" / "bin" / "uv"  # the pinned uv that ./run installs
    if uv.exists():
        return str(uv)
    found = shutil.which("uv")
    if found is None:
        pytest.skip("uv is not installed")
    return found


def _uv_run(args: list[str], project: Path) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("UV_")}
    env |= {"UV_OFFLINE": "1", "UV_PYTHON_DOWNLOADS": "never", "UV_NO_PROGRESS": "1"}
    proc = subprocess.run(
        [_uv(), *args], cwd=project, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _elsewhere(tmp_path: Path) -> Path:
    """The project as a machine without the wheel folder sees it: pyproject.toml and uv.lock with the
    folder's path pointing at a directory that does not exist (no network, no privileges needed)."""
    missing = str(tmp_path / "no-such-wheels-folder")
    for name in ("pyproject.toml", "uv.lock"):
        (tmp_path / name).write_text((REPO / name).read_text().replace(WHEELS, missing))
    (tmp_path / "README.md").write_text("readme\n")
    assert not Path(missing).exists()
    return tmp_path


def _locked_torch(project: Path, *flags: str) -> tuple[dict, set[str]]:
    """torch's entry in the exact install set `uv sync --frozen --no-dev <flags>` would use, and every
    package name in it (a PEP 751 lock exported from uv.lock, sources included)."""
    text = _uv_run(["export", "--frozen", "--no-dev", "--no-emit-project", "--format", "pylock.toml", *flags], project)
    packages = tomllib.loads(text)["packages"]
    torch = [p for p in packages if p["name"] == "torch"]
    assert len(torch) == 1, torch
    return torch[0], {p["name"] for p in packages}


def test_docker_image_syncs_the_lock_with_the_gpu_extra() -> None:
    lines = (REPO / "deployments" / "Dockerfile").read_text().splitlines()
    instructions = "\n".join(line for line in lines if not line.lstrip().startswith("#"))
    syncs = [line for line in lines if line.startswith("RUN uv sync")]
    assert len(syncs) == 2 and all("--frozen" in line and "--extra gpu" in line for line in syncs), syncs
    assert WHEELS not in instructions and "uv pip install" not in instructions


def test_torch_is_pinned_exactly_in_two_builds() -> None:
    pyproject = _pyproject()
    assert "torch==2.13.0" in pyproject["project"]["dependencies"]
    extras = pyproject["project"]["optional-dependencies"]
    assert extras["cpu"] == extras["gpu"] == ["torch==2.13.0"]
    assert pyproject["tool"]["uv"]["conflicts"] == [[{"extra": "cpu"}, {"extra": "gpu"}]]
    assert pyproject["tool"]["uv"]["sources"]["torch"] == [{"index": "opt-wheels", "extra": "cpu"}]
    (index,) = pyproject["tool"]["uv"]["index"]
    assert index == {"name": "opt-wheels", "url": WHEELS, "format": "flat", "explicit": True}
    assert "find-links" not in pyproject["tool"]["uv"]  # a folder every resolution would read
    lock = tomllib.loads((REPO / "uv.lock").read_text())
    builds = {p["version"]: p["source"] for p in lock["package"] if p["name"] == "torch"}
    assert builds == {"2.13.0": {"registry": "https://pypi.org/simple"}, "2.13.0+cpu": {"registry": WHEELS}}


def test_cpu_extra_installs_the_wheel_folders_cpu_build() -> None:
    torch, names = _locked_torch(REPO, "--extra", "cpu")
    assert torch["version"] == "2.13.0+cpu"
    (wheel,) = torch["wheels"]
    assert wheel["url"].startswith(f"file://{WHEELS}/torch-2.13.0+cpu-cp311-") and wheel["hashes"]["sha256"]
    assert not {n for n in names if n.startswith(("nvidia-", "cuda-", "triton"))}


def test_without_the_wheel_folder_the_lock_holds_and_torch_comes_from_the_registry(tmp_path: Path) -> None:
    project = _elsewhere(tmp_path)
    _uv_run(["lock", "--check"], project)  # uv.lock matches pyproject.toml there too, offline
    torch, names = _locked_torch(project)  # what ./run installs on a machine without the folder
    assert torch["version"] == "2.13.0" and torch["index"] == "https://pypi.org/simple"
    (wheel,) = [w for w in torch["wheels"] if "cp311-cp311-manylinux" in w["url"] and "x86_64" in w["url"]]
    assert wheel["url"].startswith(PYPI_FILES) and wheel["hashes"]["sha256"]
    assert "nvidia-cudnn-cu13" in names  # PyPI's Linux torch is the CUDA 13.0 build; it runs on CPU too
    assert str(tmp_path) not in _uv_run(["export", "--frozen", "--no-dev", "--no-hashes"], project)


def test_worker_image_requirements_are_the_cuda_build_from_the_lock(tmp_path: Path) -> None:
    project = _elsewhere(tmp_path)
    torch, names = _locked_torch(project, "--extra", "gpu")
    assert torch["version"] == "2.13.0" and torch["index"] == "https://pypi.org/simple"
    assert all(w["url"].startswith(PYPI_FILES) for w in torch["wheels"])
    assert {"cuda-toolkit", "nvidia-cudnn-cu13", "nvidia-nccl-cu13", "triton"} <= names
    assert not {"prefect-docker", "prefect-kubernetes"} & names  # the `worker` group: worker machines, dev, CI
    exported = _uv_run(["export", "--frozen", "--no-dev", "--extra", "gpu", "--format", "pylock.toml"], project)
    assert "+cpu" not in exported and str(tmp_path) not in exported and WHEELS not in exported
    cuda = tomllib.loads(exported)["packages"]
    assert next(p for p in cuda if p["name"] == "cuda-toolkit")["version"].startswith("13.0.")


def test_worker_group_pins_the_gpu_pools_workers_and_dev_includes_it() -> None:
    groups = _pyproject()["dependency-groups"]
    assert groups["worker"] == ["prefect-docker==0.7.4", "prefect-kubernetes==0.8.0"]
    assert {"include-group": "worker"} in groups["dev"]  # ./run and CI render the templates with them
    lock = tomllib.loads((REPO / "uv.lock").read_text())
    locked = {p["name"]: p["version"] for p in lock["package"] if p["name"].startswith("prefect-")}
    assert locked == {"prefect-docker": "0.7.4", "prefect-kubernetes": "0.8.0"}


def test_run_picks_the_cpu_extra_only_where_the_locked_wheel_exists() -> None:
    script = (REPO / "run").read_text()
    assert "--frozen" in script and '--extra "$torch_extra"' in script
    lock = (REPO / "uv.lock").read_text()
    locked = [line for line in lock.splitlines() if f"{WHEELS}/torch-" in line]
    assert locked and all("+cpu-cp311-cp311-manylinux" in line for line in locked)


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
    for module in (
        "pipeline",
        "compressor",
        "datagen",
        "trm",
        "latent",
        "grpo",
        "sweep_fanout",
        "datagen_fanout",
        "fanout",
    ):
        assert any(e.startswith(f"flows/{module}.py:") for e in entrypoints), module
    assert all("llm-trm" in d["tags"] for d in spec["deployments"])  # the automations match on this tag
    docker = by_name["pipeline-smollm3-gpu"]["work_pool"]
    assert docker["name"] == "llm-trm-gpu" and docker["job_variables"]["gpus"] == 1  # tests/test_job_templates.py
    docker_template = json.loads((REPO / "deployments" / "docker-gpu-job-template.json").read_text())
    (request,) = docker_template["job_configuration"]["container_create_kwargs"]["device_requests"]
    assert request["Count"] == "{{ gpus }}" and request["Capabilities"] == [["gpu"]]
    template = json.loads((REPO / "deployments" / "k8s-gpu-job-template.json").read_text())
    container = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpus }}"
    assert by_name["sweep-smollm3-k8s"]["work_pool"]["name"] == "llm-trm-gpu-k8s"
    nightly = by_name["sweep-nightly"]
    assert nightly["schedules"][0]["cron"] and nightly["parameters"]["deployment"] == "sweep/sweep-local"
    assert by_name["sweep-local"]["concurrency_limit"]["limit"] >= 1
    assert all(d["work_pool"]["job_variables"]["env"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] for d in spec["deployments"])


def test_every_graph_command_is_deployed_by_its_flow_and_no_deployment_is_stale() -> None:
    """prefect.yaml is written by hand: each graph command (llm_trm_core/stages/graph.py COMMANDS; compressor-1b
    is the compressor flow's phase) has a `<command>-local` deployment of the flow the CLI runs for it
    (flows/cli.py FLOWS), named as the command; every deployment runs one of those flows or the sweep fan-out."""
    from flows.cli import FLOWS
    from llm_trm_core.stages.graph import COMMANDS

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    by_name = {d["name"]: d for d in spec["deployments"]}
    assert set(FLOWS) == set(COMMANDS) - {"compressor-1b"}
    entrypoints = set()
    for command, entry in FLOWS.items():
        module, name = entry.split(":")
        entrypoint = f"{module.replace('.', '/')}.py:{name}"
        assert by_name.get(f"{command}-local", {}).get("entrypoint") == entrypoint, command
        assert getattr(importlib.import_module(module), name).name == command
        entrypoints.add(entrypoint)
    fanout = "flows/sweep_fanout.py:sweep_fanout_flow"  # the scheduled sweep, one sweep-local run per D'
    shards = "flows/datagen_fanout.py:datagen_shards_flow"  # a range of datagen shards (runtime.fanout_deployment)
    parts = "flows/fanout.py:hidden_parts_flow"  # part of the corpus hidden-state pass (fanout_hiddens_deployment)
    chunks = "flows/fanout.py:evaluate_chunks_flow"  # a range of evaluation chunks (fanout_evaluate_deployment)
    known = {*entrypoints, fanout, shards, parts, chunks}
    assert [d["name"] for d in spec["deployments"] if d["entrypoint"] not in known] == []


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

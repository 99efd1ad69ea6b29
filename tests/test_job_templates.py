"""The GPU pools' base job templates, rendered into a flow run's job by the pinned workers' own code.

Each test does what a Prefect server and worker do for one flow run of a prefect.yaml deployment,
without a cluster or a docker daemon: the server's checks of the template (pool creation) and of the
job variables (flow-run creation), then the worker's `from_template_and_values` and
`prepare_for_flow_run`. Kubernetes: the plugin's job-manifest validation runs on the rendered Job,
and the Job is read into the Kubernetes client's `V1Job` model to show which fields the API would
not know. Docker: the worker's container settings go through docker-py's own translation into the
body of `POST /containers/create`.
"""

from __future__ import annotations

import asyncio
import copy
import json
import uuid
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import httpx
import jsonpatch
import pytest
import yaml
from docker import APIClient
from docker.models.containers import _create_container_args
from kubernetes_asyncio.client import ApiClient
from prefect.client.schemas.objects import FlowRun, WorkPool
from prefect.server.schemas.actions import validate_base_job_template
from prefect.utilities.schema_tools import ValidationError, validate
from prefect.utilities.templating import apply_values
from prefect.workers.base import BaseJobConfiguration
from prefect_docker.worker import DockerWorker, DockerWorkerJobConfiguration
from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

from deployments.deploy import GPU_POOLS, POOL_HINTS
from tests.helpers.prefect_server import deploy, prefect_server

REPO = Path(__file__).resolve().parent.parent
K8S_TEMPLATE = REPO / "deployments" / "k8s-gpu-job-template.json"
DOCKER_TEMPLATE = REPO / "deployments" / "docker-gpu-job-template.json"
IMAGE = "registry.example/llm-trm-gpu:0123abc"
HF_HOME = "/var/cache/huggingface"
DOCKER_API = "1.44"
C = TypeVar("C", bound=BaseJobConfiguration)


class _NoApi:
    """Stands in for the Prefect client: the templates reference no blocks or variables, so rendering
    them must not call the API at all."""

    def __getattr__(self, name: str) -> NoReturn:
        raise AssertionError(f"rendering the template called the Prefect API ({name})")


def _template(path: Path) -> dict[str, Any]:
    template: dict[str, Any] = json.loads(path.read_text())
    validate_base_job_template(template)  # what the server checks when the pool is created
    return template


def _deployment_job_variables(name: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The deployment's job variables as `prefect deploy` sends them ({{ $VAR }} from the environment)."""
    monkeypatch.setenv("LLM_TRM_GPU_IMAGE", IMAGE)
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    (deployment,) = [d for d in spec["deployments"] if d["name"] == name]
    job_variables = apply_values(deployment["work_pool"]["job_variables"], {}, remove_notset=False)
    assert isinstance(job_variables, dict) and job_variables["image"] == IMAGE
    return job_variables


def _server_accepts(template: dict[str, Any], *job_variables: dict[str, Any]) -> None:
    """The server's check when a flow run is created: defaults, then the deployment's and the flow run's
    job variables, against the pool's variables schema, required fields included."""
    properties = template["variables"]["properties"]
    merged = {key: prop["default"] for key, prop in properties.items() if "default" in prop}
    for overrides in job_variables:
        merged |= overrides
    validate(
        merged,
        template["variables"],
        raise_on_error=True,
        preprocess=True,
        ignore_required=False,
        allow_none_with_default=True,
    )


def _flow_run() -> FlowRun:
    return FlowRun(id=uuid.uuid4(), name="gpu-run", flow_id=uuid.uuid4())


def _configuration(kind: type[C], template: dict[str, Any], *job_variables: dict[str, Any]) -> C:
    """What the worker builds from the pool's template and the run's job variables (deployment's, then
    the flow run's), once the server has accepted those."""
    _server_accepts(template, *job_variables)
    values: dict[str, Any] = {}
    for overrides in job_variables:
        values |= overrides
    return asyncio.run(kind.from_template_and_values(template, values, client=_NoApi()))  # type: ignore[arg-type]


def _render_k8s(
    template: dict[str, Any], flow_run: FlowRun, *job_variables: dict[str, Any]
) -> KubernetesWorkerJobConfiguration:
    config = _configuration(KubernetesWorkerJobConfiguration, template, *job_variables)
    pool = WorkPool(
        name="llm-trm-gpu-k8s", type="kubernetes", base_job_template=template, default_queue_id=uuid.uuid4()
    )
    config.prepare_for_flow_run(flow_run, work_pool=pool)
    # the plugin's manifest validation once more, on the Job as the worker will submit it
    KubernetesWorkerJobConfiguration.model_validate(config.model_dump())
    return config


def _container_create_body(
    template: dict[str, Any], flow_run: FlowRun, *job_variables: dict[str, Any]
) -> dict[str, Any]:
    """The JSON body the docker worker would POST to /containers/create for this flow run."""

    class _Daemon:  # the one daemon call the settings need: the engine version (host-gateway support)
        def version(self) -> dict[str, str]:
            return {"Version": "27.3.1"}

    config = _configuration(DockerWorkerJobConfiguration, template, *job_variables)
    config.prepare_for_flow_run(flow_run)
    settings = DockerWorker(work_pool_name="llm-trm-gpu")._build_container_settings(_Daemon(), config)
    create_kwargs = _create_container_args({**settings, "version": DOCKER_API})
    create_kwargs.pop("name")  # a query parameter of the request, not part of its body
    api = APIClient(base_url="unix:///nonexistent/docker.sock", version=DOCKER_API)  # never connects
    body: dict[str, Any] = api.create_container_config(**create_kwargs)
    return body


def _pod_spec(config: KubernetesWorkerJobConfiguration) -> dict[str, Any]:
    pod: dict[str, Any] = config.job_manifest["spec"]["template"]["spec"]
    return pod


# -- kubernetes ----------------------------------------------------------------------------------


def test_k8s_job_renders_one_gpu_on_spot_nodes_with_the_hf_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    template = _template(K8S_TEMPLATE)
    flow_run = _flow_run()
    config = _render_k8s(template, flow_run, _deployment_job_variables("sweep-smollm3-k8s", monkeypatch))
    pod = _pod_spec(config)
    (container,) = pod["containers"]
    assert container["image"] == IMAGE
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1  # the default: one GPU, one process
    spot_h100 = {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb", "cloud.google.com/gke-spot": "true"}
    assert pod["nodeSelector"] == spot_h100
    tolerated = {(t["key"], t["effect"]) for t in pod["tolerations"]}
    assert {("nvidia.com/gpu", "NoSchedule"), ("cloud.google.com/gke-spot", "NoSchedule")} <= tolerated
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["HF_HOME"] == HF_HOME and env["PREFECT__FLOW_RUN_ID"] == str(flow_run.id)
    assert env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "60"  # the deployment's env, merged
    # backoffLimit 0: a spot reclaim's SIGTERM reschedules the flow run instead of failing it (plugin's rule)
    assert env["PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR"] == "reschedule"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts == {"dshm": "/dev/shm", "hf-cache": HF_HOME}
    assert volumes["hf-cache"]["hostPath"]["type"] == "DirectoryOrCreate"
    assert container["args"] == ["prefect", "flow-run", "execute"]
    assert config.job_manifest["metadata"]["namespace"] == "llm-trm"
    assert pod["restartPolicy"] == "Never"


def test_k8s_job_is_a_batch_v1_job_to_the_kubernetes_client(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every rendered field is one the Kubernetes API knows, except the two the plugin's validation
    demands in the pod spec (Kubernetes drops them; the Job keeps its defaults, one pod)."""
    deployment = _deployment_job_variables("sweep-smollm3-k8s", monkeypatch)
    config = _render_k8s(_template(K8S_TEMPLATE), _flow_run(), deployment)

    async def round_trip(manifest: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        api = ApiClient()
        try:
            job = api._ApiClient__deserialize(copy.deepcopy(manifest), "V1Job")  # type: ignore[attr-defined]
            return job, api.sanitize_for_serialization(job)
        finally:
            await api.close()

    job, known = asyncio.run(round_trip(config.job_manifest))
    changes = jsonpatch.JsonPatch.from_diff(config.job_manifest, known).patch
    assert sorted((c["op"], c["path"]) for c in changes) == [
        ("remove", "/spec/template/spec/completions"),
        ("remove", "/spec/template/spec/parallelism"),
        ("replace", "/spec/template/spec/containers/0/resources/limits/nvidia.com~1gpu"),  # 1 -> "1", a quantity
    ]
    assert job.spec.backoff_limit == 0 and job.spec.template.spec.restart_policy == "Never"
    assert job.spec.template.spec.containers[0].resources.limits["nvidia.com/gpu"] == "1"


def test_k8s_job_variables_override_gpus_node_selector_and_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    template = _template(K8S_TEMPLATE)
    claim = {"name": "hf-cache", "persistentVolumeClaim": {"claimName": "llm-trm-hf-cache"}}
    on_demand = {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    run_overrides = {"gpus": 4, "node_selector": on_demand, "hf_cache_volume": claim, "hf_home": "/hf"}
    deployment = _deployment_job_variables("sweep-smollm3-k8s", monkeypatch)
    config = _render_k8s(template, _flow_run(), deployment, run_overrides)
    pod = _pod_spec(config)
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert pod["nodeSelector"] == on_demand
    assert {v["name"]: v for v in pod["volumes"]}["hf-cache"] == claim
    assert {m["name"]: m["mountPath"] for m in container["volumeMounts"]}["hf-cache"] == "/hf"
    assert {e["name"]: e["value"] for e in container["env"]}["HF_HOME"] == "/hf"
    with pytest.raises(ValidationError, match="gpus"):
        _server_accepts(template, {"image": IMAGE, "gpus": 0})  # a GPU pool's run without a GPU is refused


def test_k8s_plugin_rejects_a_job_without_completions_and_parallelism(monkeypatch: pytest.MonkeyPatch) -> None:
    """The validation the template passes is real: the template as it was (no completions/parallelism
    in the pod spec) is refused by the same code for every flow run."""
    template = _template(K8S_TEMPLATE)
    pod = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    del pod["completions"], pod["parallelism"]
    with pytest.raises(ValueError, match=r"/spec/template/spec/completions, /spec/template/spec/parallelism"):
        _render_k8s(template, _flow_run(), _deployment_job_variables("sweep-smollm3-k8s", monkeypatch))


# -- docker --------------------------------------------------------------------------------------


def test_docker_container_requests_one_gpu_with_the_hf_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    flow_run = _flow_run()
    body = _container_create_body(
        _template(DOCKER_TEMPLATE), flow_run, _deployment_job_variables("pipeline-smollm3-gpu", monkeypatch)
    )
    assert body["Image"] == IMAGE
    host = body["HostConfig"]
    assert host["DeviceRequests"] == [
        {"Driver": "nvidia", "Count": 1, "DeviceIDs": [], "Capabilities": [["gpu"]], "Options": {}}
    ]  # the default: one GPU, not Count -1 (every GPU of the host)
    assert host["ShmSize"] == 16 * 1024**3
    assert host["Binds"] == [f"llm-trm-hf-cache:{HF_HOME}"]
    assert host["AutoRemove"] is True
    env = dict(item.split("=", 1) for item in body["Env"])
    assert env["HF_HOME"] == HF_HOME and env["PREFECT__FLOW_RUN_ID"] == str(flow_run.id)
    assert env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "60"
    assert body["Cmd"] == ["prefect", "flow-run", "execute"]


def test_docker_job_variables_override_gpus_and_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    template = _template(DOCKER_TEMPLATE)
    deployment = _deployment_job_variables("pipeline-smollm3-gpu", monkeypatch)
    body = _container_create_body(template, _flow_run(), deployment, {"gpus": 2, "hf_cache_volume": "/mnt/hf"})
    assert [r["Count"] for r in body["HostConfig"]["DeviceRequests"]] == [2]
    assert body["HostConfig"]["Binds"] == [f"/mnt/hf:{HF_HOME}"]
    everything = _container_create_body(template, _flow_run(), deployment, {"gpus": -1})
    assert [r["Count"] for r in everything["HostConfig"]["DeviceRequests"]] == [-1]
    with pytest.raises(ValidationError, match="gpus"):
        _server_accepts(template, deployment, {"gpus": "all"})


def test_gpu_deployments_request_one_gpu_in_both_pools() -> None:
    """The same job variable, the same default, in both pools: one GPU per run unless a run asks for more
    (the code then uses them all: test_the_gpus_a_run_gets_are_the_processes_its_generation_stages_start)."""
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    gpu_pools = {d["work_pool"]["name"]: d["work_pool"]["job_variables"] for d in spec["deployments"]}
    for pool, path in (("llm-trm-gpu", DOCKER_TEMPLATE), ("llm-trm-gpu-k8s", K8S_TEMPLATE)):
        assert gpu_pools[pool]["gpus"] == 1, pool
        assert json.loads(path.read_text())["variables"]["properties"]["gpus"]["default"] == 1, path
    assert "container_create_kwargs" not in gpu_pools["llm-trm-gpu"]  # the template owns the device request


def test_deploy_hints_create_each_gpu_pool_from_its_template() -> None:
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    gpu_pools = {d["work_pool"]["name"] for d in spec["deployments"] if "gpus" in d["work_pool"]["job_variables"]}
    assert gpu_pools == set(GPU_POOLS)
    for name, (kind, template) in GPU_POOLS.items():
        assert _template(REPO / template)["variables"]["properties"]["gpus"]["default"] == 1
        assert f"--type {kind} --base-job-template {template}" in POOL_HINTS[name]


# -- a real server -------------------------------------------------------------------------------


def test_server_takes_the_gpu_pools_deployments_and_runs_job_variables(tmp_path: Path) -> None:
    """`deployments.deploy --gpu-pools` on a real `prefect server`: the server creates both GPU pools from
    the templates, accepts the GPU deployments' job variables, refuses a run asking for no GPU, and the
    job the worker renders from what the server holds asks for the GPUs the run asked for."""
    with prefect_server(tmp_path) as (api, env):
        env |= {"LLM_TRM_GPU_IMAGE": IMAGE, "LLM_TRM_STORE": "gs://llm-trm-test/gpu"}
        done = deploy(env, "--gpu-pools")
        assert "skipped" not in done.stderr, done.stderr
        for name, (kind, template) in GPU_POOLS.items():
            pool = httpx.get(f"{api}/work_pools/{name}").json()
            assert pool["type"] == kind and pool["base_job_template"] == json.loads((REPO / template).read_text())

        k8s = httpx.get(f"{api}/deployments/name/sweep/sweep-smollm3-k8s").json()
        docker = httpx.get(f"{api}/deployments/name/pipeline/pipeline-smollm3-gpu").json()
        assert k8s["job_variables"]["gpus"] == docker["job_variables"]["gpus"] == 1
        assert k8s["job_variables"]["image"] == docker["job_variables"]["image"] == IMAGE

        def create_run(deployment: dict[str, Any], job_variables: dict[str, Any]) -> httpx.Response:
            body = {"parameters": {}, "job_variables": job_variables}
            return httpx.post(f"{api}/deployments/{deployment['id']}/create_flow_run", json=body)

        refused = create_run(k8s, {"gpus": 0})
        assert refused.status_code == 422 and "gpus" in refused.text, refused.text
        run = create_run(k8s, {"gpus": 2})
        assert run.status_code == 201, run.text
        pool = httpx.get(f"{api}/work_pools/llm-trm-gpu-k8s").json()
        flow_run = FlowRun.model_validate(run.json())
        config = _render_k8s(pool["base_job_template"], flow_run, k8s["job_variables"], run.json()["job_variables"])
        assert _pod_spec(config)["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 2


@pytest.mark.parametrize("gpus", [1, 4])
def test_the_gpus_a_run_gets_are_the_processes_its_generation_stages_start(
    gpus: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every GPU deployment's run, rendered with `gpus` by its pool's plugin, asks for that many GPUs; its
    config (the deployment's `cfg`, generation_processes left at auto) then starts one generation process
    per GPU the container sees (llm_trm_core/stages/spread.py), so what is requested is what is used."""
    import torch

    from llm_trm_core.config import PipelineConfig
    from llm_trm_core.launch import generation_processes

    monkeypatch.setenv("LLM_TRM_STORE", "gs://llm-trm-test/gpu")
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    gpu_deployments = [d for d in spec["deployments"] if d["work_pool"]["name"] in GPU_POOLS]
    assert len(gpu_deployments) >= 5
    for d in gpu_deployments:
        deployment = _deployment_job_variables(d["name"], monkeypatch)
        if d["work_pool"]["name"] == "llm-trm-gpu":
            body = _container_create_body(_template(DOCKER_TEMPLATE), _flow_run(), deployment, {"gpus": gpus})
            (requested,) = [r["Count"] for r in body["HostConfig"]["DeviceRequests"]]
        else:
            config = _render_k8s(_template(K8S_TEMPLATE), _flow_run(), deployment, {"gpus": gpus})
            requested = _pod_spec(config)["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
        assert requested == gpus, d["name"]
        cfg = PipelineConfig.model_validate(apply_values(d["parameters"]["cfg"], {}, remove_notset=False))
        assert cfg.runtime.generation_processes == "auto", d["name"]
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda seen=requested: seen)  # what the container sees
        assert generation_processes(cfg.runtime) == gpus, d["name"]

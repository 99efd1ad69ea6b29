"""Real Prefect servers, workers and system services for the end-to-end tests.

`prefect server start` on 127.0.0.1 with an isolated PREFECT_HOME (SQLite, or a real PostgreSQL started by
`postgres()`), process workers, the project's deploy script, and waiting on flow runs through the REST API.
Debian packages the tests need (chromium, postgresql) are installed on first use when missing (the tests
run as root in CI); elsewhere the failure names the command to run.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[2]
PREFECT = str(Path(sys.executable).parent / "prefect")
FINAL_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[Any], what: str, timeout: float = 30.0) -> None:
    """Return once 127.0.0.1:`port` accepts connections; RuntimeError if `proc` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not listen on port {port} within {timeout} s") from None
            time.sleep(0.1)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=20)


def ensure_debian_package(binary: str, package: str) -> str:
    """Path of `binary`, installing Debian's `package` first if it is missing (root only)."""
    found = shutil.which(binary) or next(iter(sorted(glob.glob(binary))), None)
    if found:
        return found
    if os.geteuid() != 0:
        raise RuntimeError(f"{binary} is missing: install it with `sudo apt-get install -y {package}`")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, capture_output=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", package], check=True, env=env, capture_output=True)
    found = shutil.which(binary) or next(iter(sorted(glob.glob(binary))), None)
    if not found:
        raise RuntimeError(f"apt-get install {package} did not provide {binary}")
    return found


@contextlib.contextmanager
def postgres() -> Iterator[str]:
    """A throwaway PostgreSQL cluster (Debian's package) on 127.0.0.1; yields a Prefect database URL."""
    initdb = ensure_debian_package("/usr/lib/postgresql/*/bin/initdb", "postgresql")
    bindir = Path(initdb).parent
    data = Path(tempfile.mkdtemp(prefix="llm-trm-pg-"))
    as_postgres: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root
        shutil.chown(data, "postgres", "postgres")
        as_postgres = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    run: dict[str, Any] = {"check": True, "capture_output": True, "text": True, "timeout": 120}
    subprocess.run([*as_postgres, str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust"], **run)
    options = f"-h 127.0.0.1 -p {port} -k {data} -c max_connections=200 -c fsync=off"
    # the server outlives pg_ctl: give it a log file, not our pipes (run() would wait for their EOF forever)
    pg_ctl = [*as_postgres, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(data / "server.log")]
    subprocess.run(
        [*pg_ctl, "-o", options, "-w", "start"],
        check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120,
    )  # fmt: skip
    try:
        subprocess.run(
            [str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "prefect"], **run
        )
        yield f"postgresql+asyncpg://postgres@127.0.0.1:{port}/prefect"
    finally:
        stopped = [*as_postgres, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]
        subprocess.run(stopped, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
        shutil.rmtree(data, ignore_errors=True)


@contextlib.contextmanager
def prefect_server(tmp_path: Path, database_url: str | None = None) -> Iterator[tuple[str, dict[str, str]]]:
    """`prefect server start` on a free port; yields (API URL, the environment for CLI and workers)."""
    home = tmp_path / "prefect-home"
    home.mkdir(exist_ok=True)
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home), PREFECT_API_URL=api, PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_API_DATABASE_CONNECTION_URL=database_url or f"sqlite+aiosqlite:///{home}/prefect.db",
        PREFECT_LOCAL_STORAGE_PATH=str(home / "storage"), PREFECT_LOGGING_LEVEL="INFO",
    )  # fmt: skip
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env, stdout=log, stderr=log
        )
        try:
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                try:
                    if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.5)
            else:
                raise RuntimeError("prefect server did not become healthy: " + log_path.read_text()[-2000:])
            yield api, env
        finally:
            stop(proc)


def prefect_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([PREFECT, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (args, done.stdout[-2000:], done.stderr[-2000:])
    return done


def deploy(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """The README's deploy command: every deployment whose pool exists (the local pool is created)."""
    done = subprocess.run(
        [sys.executable, "-m", "deployments.deploy", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-2000:])
    return done


@contextlib.contextmanager
def worker(env: dict[str, str], log_path: Path, *extra: str, **extra_env: str) -> Iterator[subprocess.Popen[bytes]]:
    """A process worker on the local pool, polling every 2 s."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [PREFECT, "worker", "start", "--pool", "llm-trm-local", *extra],
            cwd=REPO, env={**env, "PREFECT_WORKER_QUERY_SECONDS": "2", **extra_env}, stdout=log, stderr=log,
        )  # fmt: skip
        try:
            yield proc
        finally:
            stop(proc)


def create_run(api: str, deployment: str, parameters: dict[str, Any]) -> str:
    """POST a flow run as the UI does; SQLite answers 503 while another writer holds it, so retry those."""
    dep = httpx.get(f"{api}/deployments/name/{deployment}").json()
    for _ in range(20):
        created = httpx.post(f"{api}/deployments/{dep['id']}/create_flow_run", json={"parameters": parameters})
        if created.status_code != 503:
            break
        time.sleep(1)
    assert created.status_code == 201, created.text
    return str(created.json()["id"])


def wait_final(api: str, run_id: str, timeout: float, previous: set[str] | None = None) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    run: dict[str, Any] = {}
    while time.monotonic() < deadline:
        run = httpx.get(f"{api}/flow_runs/{run_id}").json()
        if run["state_type"] in FINAL_STATES and run["state_type"] not in (previous or set()):
            return run
        time.sleep(1)
    raise TimeoutError(f"flow run {run_id} still {run.get('state_type')} after {timeout} s")

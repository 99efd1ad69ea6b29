"""Chaos driver: SIGKILL the real `llm-trm pipeline` process group at seeded random points, check the store
after every kill, re-run to completion, and compare every committed file with an uninterrupted run.

How a kill point is chosen. The tiny pipeline runs its stage tasks one after another (18 tasks, each
committing one or more artifacts; the list is read from the reference run, not hard-coded). With `-v` the
CLI logs `prefect.task_runs: Finished in state ...` once per task (cached or computed), so "task number k
is running" is visible on the log stream: k such lines have been printed. An uninterrupted reference run,
timed line by line, gives every task's duration (from the previous task's end to its own end, Prefect's
bookkeeping included) and the artifacts it commits. A kill aimed at task k waits for the k-th line, then
sleeps a seeded random fraction of task k's reference duration (AIM_FRACTION) and kills the whole process
group (`os.killpg(..., SIGKILL)`; the CLI runs in its own session). Task 0 starts at "Beginning flow run".

Which task a kill actually hit is read afterwards from what the killed process wrote before it died (the
pipe is drained to EOF): the number of Finished lines is the index of the task that was running, and the
store says whether that task's manifest was already written ("after commit": killed in Prefect's
bookkeeping) or not ("before commit": killed while it computed or wrote files).

After every kill `check_store_after_kill` checks what any reader can see: a folder with a manifest opens
with every file's sha256 verified, lists no temporary file, and equals the reference artifact byte for byte
(a commit is final); a folder without one is refused by `read_manifest`/`open` and left out of `list_keys`.

`compare_with_reference` (after the final, uninterrupted re-run) hashes every file listed in every committed
manifest independently and compares them with the reference run's, and compares the manifests themselves
without the fields that legitimately differ between two runs: RUN_DEPENDENT_MANIFEST_FIELDS, TIMING_KEYS
and TIMED_FILES (evaluate's per-answer timings, the only run-dependent values inside committed files).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm_trm_core.errors import ArtifactNotCommittedError
from llm_trm_core.store import MANIFEST_NAME, TMP_MARKER, ArtifactStore

REPO = Path(__file__).resolve().parents[2]

FLOW_START = re.compile(r"prefect\.flow_runs: Beginning flow run")
TASK_END = re.compile(r"prefect\.task_runs: Finished in state")
COMMIT = re.compile(r"llm_trm_core\.store: committed (\S+) \(")

# Manifest fields that differ between two runs of the same config, and why:
#   created_at, completed_at  wall-clock timestamps
#   uri                       where the artifact is (another root); not part of the manifest digest
#   git_sha                   the checkout's commit when the stage ran (commits may land between runs)
#   manifest_sha256           the digest of the fields above (created_at/completed_at are in it)
RUN_DEPENDENT_MANIFEST_FIELDS = ("created_at", "completed_at", "uri", "git_sha", "manifest_sha256")
# Run-dependent values, wherever they appear in a manifest's `metrics` or in a JSON file below: wall times
# (`seconds` of a stage, `sgd.seconds`, `training.seconds`; evaluate's `seconds_per_answer` per arm and per
# table row) and `resumed_from` (the checkpoint a resumed trm/latent/grpo/compressor run started from: None
# in an uninterrupted run; the weights and every file are still byte-identical).
TIMING_KEYS = frozenset({"seconds", "seconds_per_answer", "resumed_from"})
# The only committed files that hold timings: evaluate's answers (each answer's `seconds`) and its report
# (the `seconds_per_answer` column). They are compared with those values masked (`normalized`), and their
# manifest entries (size, sha256) are left out of the manifest comparison. Every other file must be
# byte-identical.
TIMED_FILES = frozenset({("evaluate", "answers.json"), ("evaluate", "report.md")})


def pipeline_command(root: str, command: str = "pipeline") -> list[str]:
    return [sys.executable, "-m", "flows.cli", "-v", command, "--preset", "tiny", "--store", root]


def pipeline_env(prefect_home: Path) -> dict[str, str]:
    """The test session's environment with a private PREFECT_HOME (ephemeral server, own SQLite database)."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(prefect_home)
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "300"
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class RunLog:
    """A pipeline run's merged stdout/stderr, each line with the monotonic time it arrived."""

    lines: list[tuple[float, str]] = field(default_factory=list)
    started: float = 0.0
    returncode: int | None = None

    def text(self) -> str:
        return "".join(line for _, line in self.lines)

    def tail(self, n: int = 4000) -> str:
        return self.text()[-n:]

    def task_ends(self) -> list[float]:
        return [t for t, line in self.lines if TASK_END.search(line)]

    def flow_start(self) -> float | None:
        return next((t for t, line in self.lines if FLOW_START.search(line)), None)

    def commits(self) -> list[str]:
        return [m.group(1) for _, line in self.lines if (m := COMMIT.search(line))]


class PipelineProcess:
    """`llm-trm pipeline --preset tiny` in its own process group, its output read line by line in a thread."""

    def __init__(self, root: str, env: Mapping[str, str], command: str = "pipeline") -> None:
        self.log = RunLog(started=time.monotonic())
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(
            pipeline_command(root, command), cwd=REPO, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, start_new_session=True,
        )  # fmt: skip
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.log.lines.append((time.monotonic(), line))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for_task(self, index: int, timeout: float) -> bool:
        """Block until task `index` is running (index Finished lines seen); False if the process ended first."""

        def reached() -> bool:
            if index == 0:
                return self.log.flow_start() is not None
            return len(self.log.task_ends()) >= index

        deadline = time.monotonic() + timeout
        with self._cond:
            while not reached():
                if self.proc.poll() is not None and not self._reader.is_alive():
                    return False
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"task {index} did not start within {timeout} s:\n{self.log.tail()}")
                self._cond.wait(min(left, 0.05))
        return True

    def kill_group(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    def finish(self, timeout: float) -> RunLog:
        try:
            self.log.returncode = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_group()
            self.log.returncode = self.proc.wait(timeout=30)
        self._reader.join(timeout=30)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.log


def run_to_completion(root: str, env: Mapping[str, str], command: str = "pipeline", timeout: float = 900) -> RunLog:
    log = PipelineProcess(root, env, command).finish(timeout)
    assert log.returncode == 0, f"pipeline exited {log.returncode}:\n{log.tail()}"
    return log


@dataclass
class Reference:
    """An uninterrupted run: task durations, the committed artifacts in task order, and every file's sha256."""

    root: str
    command: str  # the CLI command: pipeline, pairs...
    tasks: list[str]  # task names in run order: the stage of its (last) commit, `#2` for a second one
    durations: list[float]  # per task, seconds (previous task's end, or flow start, to its end)
    artifacts: list[list[tuple[str, str]]]  # per task, the (stage, key) it committed
    files: dict[tuple[str, str], dict[str, str]]  # (stage, key) -> relpath -> sha256 (hashed here)
    manifests: dict[tuple[str, str], dict[str, Any]]  # comparable manifest content
    wall_s: float


def without_timings(obj: Any) -> Any:
    """`obj` with every TIMING_KEYS entry removed, at any depth."""
    if isinstance(obj, dict):
        return {k: without_timings(v) for k, v in obj.items() if k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [without_timings(v) for v in obj]
    return obj


def _mask_timing_columns(markdown: str) -> str:
    """Markdown with the cells of every table column named in TIMING_KEYS replaced by `*`."""
    out, masked = [], set[int]()
    for line in markdown.splitlines():
        if not line.startswith("|"):
            masked = set()
            out.append(line)
            continue
        cells = line.split("|")
        if not masked:
            masked = {i for i, c in enumerate(cells) if c.strip() in TIMING_KEYS} or {-1}
        out.append("|".join("*" if i in masked else c for i, c in enumerate(cells)))
    return "\n".join(out)


def normalized(stage: str, relpath: str, data: bytes) -> bytes:
    """A committed file's bytes as compared between runs: themselves, or for TIMED_FILES, timings masked."""
    if (stage, relpath) not in TIMED_FILES:
        return data
    if relpath.endswith(".json"):
        return json.dumps(without_timings(json.loads(data)), sort_keys=True).encode()
    return _mask_timing_columns(data.decode()).encode()


def stable_manifest(raw: Mapping[str, Any]) -> dict[str, Any]:
    """A manifest's content without the run-dependent fields and timings (documented above)."""
    out = {k: v for k, v in raw.items() if k not in RUN_DEPENDENT_MANIFEST_FIELDS}
    out["metrics"] = without_timings(out.get("metrics", {}))
    out["files"] = {
        rel: "timed" if (raw["stage"], rel) in TIMED_FILES else entry for rel, entry in out["files"].items()
    }
    return out


def committed_folders(store: ArtifactStore) -> dict[tuple[str, str], bool]:
    """Every `{stage}/{key}` folder in the store (the `_prefect/` tree aside) -> whether it has a manifest."""
    out: dict[tuple[str, str], bool] = {}
    store.fs.invalidate_cache()  # gcsfs caches listings; the pipeline wrote in another process
    if not store.fs.exists(store.base):
        return out
    for stage_dir in store.fs.ls(store.base, detail=False):
        stage = str(stage_dir).rstrip("/").rsplit("/", 1)[-1]
        if stage.startswith("_"):
            continue
        for key_dir in store.fs.ls(stage_dir, detail=False):
            key = str(key_dir).rstrip("/").rsplit("/", 1)[-1]
            out[(stage, key)] = store.fs.exists(store.path(stage, key, MANIFEST_NAME))
    return out


def hash_files(store: ArtifactStore, stage: str, key: str, relpaths: list[str]) -> dict[str, str]:
    """sha256 of each file's bytes as read from the store (TIMED_FILES: with timings masked)."""
    return {
        rel: hashlib.sha256(normalized(stage, rel, store.fs.cat_file(store.path(stage, key, rel)))).hexdigest()
        for rel in relpaths
    }


def snapshot(store: ArtifactStore) -> tuple[dict[tuple[str, str], dict[str, str]], dict[tuple[str, str], Any]]:
    """Every committed artifact's files (hashed from the bytes, not taken from the manifest) and manifest."""
    files, manifests = {}, {}
    for (stage, key), committed in sorted(committed_folders(store).items()):
        if not committed:
            continue
        raw = json.loads(store.fs.cat_file(store.path(stage, key, MANIFEST_NAME)))
        files[(stage, key)] = hash_files(store, stage, key, sorted(raw["files"]))
        manifests[(stage, key)] = stable_manifest(raw)
    return files, manifests


def make_reference(root: str, env: Mapping[str, str], command: str = "pipeline") -> Reference:
    t0 = time.monotonic()
    log = run_to_completion(root, env, command)
    wall = time.monotonic() - t0
    start, ends = log.flow_start(), log.task_ends()
    assert start is not None and ends, log.tail()
    durations = [b - a for a, b in zip([start, *ends[:-1]], ends, strict=True)]
    store = ArtifactStore(root)
    # each task's commits: the commit lines between the previous task's Finished line and its own
    artifacts: list[list[tuple[str, str]]] = [[] for _ in ends]
    for t, line in log.lines:
        if m := COMMIT.search(line):
            task = next(i for i, end in enumerate(ends) if t <= end)
            artifacts[task].append(_stage_key(store, m.group(1)))
    assert all(artifacts), f"a task committed nothing: {artifacts}"
    tasks: list[str] = []
    for committed in artifacts:
        stage = committed[-1][0]
        seen = sum(1 for name in tasks if name.split("#")[0] == stage)
        tasks.append(stage if not seen else f"{stage}#{seen + 1}")
    files, manifests = snapshot(store)
    assert set(files) == {sk for committed in artifacts for sk in committed}
    return Reference(root, command, tasks, durations, artifacts, files, manifests, wall)


def _stage_key(store: ArtifactStore, uri: str) -> tuple[str, str]:
    stage, key = uri.removeprefix(store.root).strip("/").split("/")[:2]
    return stage, key


@dataclass
class Kill:
    target: int  # the task aimed at
    delay_s: float  # seeded offset after that task started
    hit: int | None  # the task running when the process group died (None: every task had finished)
    before_commit: bool  # the hit task's manifest was not written yet
    temporaries: int  # temporary files present in the store after the kill
    uncommitted: int  # folders without a manifest after the kill
    returncode: int | None


def _assert_same(what: str, got: Mapping[str, Any], want: Mapping[str, Any]) -> None:
    """Equal mappings, or an error naming every entry that differs."""
    differ = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
    assert not differ, f"{what} differs from the uninterrupted run in " + "; ".join(
        f"{k}: {got.get(k)!r:.300} != {want.get(k)!r:.300}" for k in differ
    )


def check_store_after_kill(store: ArtifactStore, ref: Reference) -> tuple[int, int]:
    """What a reader sees right after a kill; returns (temporary files present, uncommitted folders)."""
    temporaries = uncommitted = 0
    for (stage, key), committed in sorted(committed_folders(store).items()):
        folder = store.path(stage, key)
        on_disk = [str(p) for p in store.fs.find(folder)]
        temporaries += sum(TMP_MARKER in p.rsplit("/", 1)[-1] for p in on_disk)
        assert (stage, key) in ref.files, f"{folder}: a folder the uninterrupted run never made"
        if committed:
            artifact = store.open(stage, key, verify="sha256")  # every listed file there, its sha256 right
            assert not any(TMP_MARKER in rel for rel in artifact.files()), artifact.files()
            assert key in store.list_keys(stage)
            raw = json.loads(store.fs.cat_file(store.path(stage, key, MANIFEST_NAME)))
            _assert_same(folder, hash_files(store, stage, key, sorted(raw["files"])), ref.files[(stage, key)])
            _assert_same(f"{folder} manifest", stable_manifest(raw), ref.manifests[(stage, key)])
        else:
            uncommitted += 1
            assert store.read_manifest(stage, key) is None
            assert key not in store.list_keys(stage)
            try:
                store.open(stage, key)
            except ArtifactNotCommittedError as exc:
                assert "is not committed" in str(exc)
            else:
                raise AssertionError(f"{folder} has no manifest but the store opened it")
    return temporaries, uncommitted


def kill_once(root: str, env: Mapping[str, str], ref: Reference, target: int, delay: float) -> Kill:
    """One trial: start the pipeline, SIGKILL its process group `delay` s after task `target` starts."""
    run = PipelineProcess(root, env, ref.command)
    if run.wait_for_task(target, timeout=600):
        time.sleep(delay)
        run.kill_group()
    log = run.finish(timeout=900)  # drained to EOF: every line the process wrote before it died
    store = ArtifactStore(root)
    store.fs.invalidate_cache()
    if log.returncode == 0:
        hit, before = None, False
    else:
        assert log.returncode == -signal.SIGKILL, f"the pipeline failed on its own ({log.returncode}):\n{log.tail()}"
        finished = len(log.task_ends())
        assert finished <= len(ref.tasks), log.tail()
        if finished == len(ref.tasks):  # killed after the last task, while the CLI shut down: no task hit
            hit, before = None, False
        else:
            hit, before = finished, not all(store.is_committed(*sk) for sk in ref.artifacts[finished])
    temporaries, uncommitted = check_store_after_kill(store, ref)
    return Kill(target, round(delay, 3), hit, before, temporaries, uncommitted, log.returncode)


def first_uncommitted(store: ArtifactStore, ref: Reference) -> int | None:
    store.fs.invalidate_cache()
    return next(
        (i for i, committed in enumerate(ref.artifacts) if not all(store.is_committed(*sk) for sk in committed)), None
    )


# Kills are drawn from the first 60% of the aimed task's reference duration: a run faster than the reference
# (a cached or resumed part, less load) then still dies inside it rather than in the next task.
AIM_FRACTION = 0.6


def chaos(root: str, env: Mapping[str, str], ref: Reference, *, seed: int, targets: list[int] | None) -> list[Kill]:
    """Kill trials into `root` until every task in `targets` (None: every task) has been hit once.

    Each trial aims at the first target not yet hit whose artifact is still uncommitted, at a delay drawn
    from [0, AIM_FRACTION x its reference duration). A kill that lands later than aimed hits a later task (recorded
    as such); a target whose artifact got committed without being hit is then unreachable in this root and
    is reported by the caller. Ends with one uninterrupted run to completion.
    """
    rng = random.Random(seed)
    store = ArtifactStore(root)
    wanted = list(range(len(ref.tasks))) if targets is None else sorted(targets)
    kills: list[Kill] = []
    hit: set[int] = set()
    while True:
        frontier = first_uncommitted(store, ref)
        pending = [t for t in wanted if t not in hit and frontier is not None and t >= frontier]
        if not pending:
            break
        target = pending[0]
        delay = rng.uniform(0.0, AIM_FRACTION * ref.durations[target])
        kill = kill_once(root, env, ref, target, delay)
        kills.append(kill)
        if kill.hit is None:
            break
        hit.add(kill.hit)
    run_to_completion(root, env, ref.command)
    return kills


# A target the first pass missed is re-aimed in a fresh root seeded with the reference's artifacts of every
# earlier task, at delays drawn from ever smaller fractions of its reference duration; the last fraction is 0,
# a kill right as the task starts (the previous task's Finished line), which cannot land in a later task.
REAIM_FRACTIONS = (0.3, 0.1, 0.0)


def seed_from_reference(ref: Reference, root: str, upto: int) -> None:
    """Copy the reference's committed artifacts of tasks 0..upto-1 into `root` (manifests last), byte for byte:
    the state of a run that stopped just before task `upto`. Works across stores (file:// to gs://)."""
    src, dst = ArtifactStore(ref.root), ArtifactStore(root)
    for stage, key in {sk for committed in ref.artifacts[:upto] for sk in committed}:
        rels = sorted(ref.files[(stage, key)])
        for rel in [*rels, MANIFEST_NAME]:
            target = dst.path(stage, key, rel)
            dst.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)  # a no-op on gs://
            dst.fs.pipe_file(target, src.fs.cat_file(src.path(stage, key, rel)))


def reaim_missed(
    root: str, env: Mapping[str, str], ref: Reference, kills: list[Kill], *, seed: int, targets: list[int] | None
) -> list[tuple[str, list[Kill]]]:
    """For every target no kill hit: fresh roots `{root}-reaim-{target}-{attempt}` (seeded by
    `seed_from_reference`), one kill each at a shrinking delay until it hits, then a run to completion.
    Returns (root, kills) per re-aimed target; each root is then compared with the reference by the caller."""
    rng = random.Random(seed + 1)
    wanted = range(len(ref.tasks)) if targets is None else targets
    hit = {k.hit for k in kills}
    out: list[tuple[str, list[Kill]]] = []
    for target in [t for t in wanted if t not in hit]:
        for attempt, fraction in enumerate(REAIM_FRACTIONS):
            fresh = f"{root}-reaim-{target}-{attempt}"
            seed_from_reference(ref, fresh, target)
            kill = kill_once(fresh, env, ref, target, rng.uniform(0.0, fraction * ref.durations[target]))
            run_to_completion(fresh, env, ref.command)
            out.append((fresh, [kill]))
            if kill.hit == target:
                break
    return out


def compare_with_reference(root: str, ref: Reference) -> None:
    """Every committed file byte-identical to the reference's; manifests equal without run-dependent fields."""
    store = ArtifactStore(root)
    folders = committed_folders(store)  # (listings re-read)
    assert all(folders.values()), [sk for sk, ok in folders.items() if not ok]
    for stage, key in folders:
        leftovers = [p for p in store.fs.find(store.path(stage, key)) if TMP_MARKER in str(p).rsplit("/", 1)[-1]]
        assert not leftovers, leftovers
    files, manifests = snapshot(store)
    assert sorted(files) == sorted(ref.files), (sorted(files), sorted(ref.files))
    for sk in ref.files:
        _assert_same(store.path(*sk), files[sk], ref.files[sk])
        _assert_same(f"{store.path(*sk)} manifest", manifests[sk], ref.manifests[sk])

"""`llm-trm`: the command line (docs/architecture.md, "CLI").

    llm-trm pipeline --preset local
    llm-trm config --preset tiny compressor.d_prime=32
    llm-trm <command> --preset {tiny,local,smollm3-3b} --store URI [key=value ...]
    llm-trm stage <command or stage> --preset tiny --store URI [key=value ...]     (without Prefect)

The commands come from the pipeline graph (llm_trm_core/stages/graph.py `COMMANDS`) and the stage
declarations (a stage with a `command`); `--preset` defaults to `local` (config.DEFAULT_PRESET) in
every one. Every command resolves one `PipelineConfig` (preset + `--store` + dotted overrides),
checks the store and the model source (`llm_trm_core.preflight`, before Prefect is even imported),
runs the matching Prefect flow, and prints the artifact keys, URIs and metrics. `stage` runs the same
graph in this process without Prefect and prints one JSON line (the torchrun workers' entry).

Exit codes: 0 done; 2 something the user fixes, printed as one `error:` line naming the cause and the
fix (bad config, unusable store, missing or incomplete model, the temporary Prefect server not
starting in time); 1 a storage or network failure that outlived the retries, or an unexpected crash.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from llm_trm_core.config import DEFAULT_PRESET, PRESETS, PipelineConfig, apply_overrides, load_config, parse_config
from llm_trm_core.errors import ConfigError, TransientError, UserError
from llm_trm_core.plan import command_stages
from llm_trm_core.preflight import preflight
from llm_trm_core.reporting import comparison_rows, flatten, fmt
from llm_trm_core.stages.declaration import STAGE_MODULES_ENV, stages
from llm_trm_core.stages.graph import COMMANDS, help_line
from llm_trm_core.store import ArtifactStore, Manifest

Manifests = dict[str, dict[str, Any]]

console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True)

app = typer.Typer(
    name="llm-trm",
    help="Tiny Recursive Models reasoning in an LLM's compressed hidden-state space, orchestrated by Prefect. "
    "Exit codes: 0 done; 2 a problem you fix (bad config, unusable store, missing model, Prefect server not "
    "started in time), printed as one error line naming the fix; 1 a storage or network failure after retries.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

PresetOption = Annotated[
    str, typer.Option("--preset", "-p", help=f"Config preset: {', '.join(PRESETS)}.", show_default=True)
]
StoreOption = Annotated[
    str | None,
    typer.Option("--store", "-s", help="Artifact store root URI (file://..., gs://bucket/prefix, memory://...)."),
]
OverridesArg = Annotated[
    list[str] | None, typer.Argument(help="Dotted config overrides, e.g. compressor.d_prime=128 runtime.seed=1.")
]


SERVER_STARTUP_TIMEOUT_S = 300
_SERVER_TIMEOUT_TEXT = "Timed out while attempting to connect to ephemeral Prefect API server"
_SERVER_NOTICES = ("Starting temporary server on", "Stopping temporary server on")


def _prepare_environment() -> None:
    """Defaults that make Prefect and gcsfs behave on a fresh machine (set before they are imported)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Prefect's default (20 s) and our former 90 s are too short on a loaded machine: the temporary
    # server took over a minute on 2 busy cores, and Prefect counts only its 0.1 s sleeps between
    # health checks, so the wall time is longer still. 300 s is several times the worst start seen;
    # a machine slower than that gets one line naming the remedies (_server_start_message).
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", str(SERVER_STARTUP_TIMEOUT_S))
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("llm_trm_core").setLevel(logging.INFO)
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not verbose:
        # Prefect announces its temporary server at INFO on every run (it serves no UI); keep stderr for
        # what matters, e.g. the one-line error when that server does not start.
        logging.getLogger("prefect").addFilter(_hide_server_notices)


def _hide_server_notices(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_SERVER_NOTICES)


def resolve(preset: str, store: str | None, overrides: list[str] | None) -> PipelineConfig:
    items = list(overrides or [])
    if store:
        items.append(f"store.root={store}")
    return load_config(preset, items)


def _run_guarded(fn: Callable[[], Any]) -> Any:
    """Run `fn`, turning user errors into one `error:` line and exit code 2."""
    try:
        return fn()
    except UserError as exc:
        _print_error("error:", str(exc))
        raise typer.Exit(code=2) from None
    except TransientError as exc:
        _print_error("error (still failing after retries):", str(exc))
        raise typer.Exit(code=1) from None
    except RuntimeError as exc:
        if _SERVER_TIMEOUT_TEXT not in str(exc):
            raise
        _print_error("error:", _server_start_message(str(exc)))
        raise typer.Exit(code=2) from None


def _print_error(label: str, message: str) -> None:
    # soft_wrap: one line whatever the terminal width (rich would wrap at 80 columns when piped).
    err_console.print(f"[bold red]{label}[/] {escape(message)}", highlight=False, soft_wrap=True)


def _server_start_message(raw: str) -> str:
    """The one line for Prefect's "Timed out while attempting to connect to ephemeral Prefect API server"."""
    limit = os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", str(SERVER_STARTUP_TIMEOUT_S))
    try:
        from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

        limit = str(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
    except Exception:  # the environment value above is the best we have
        pass
    longer = max(600, 2 * int(limit)) if limit.isdigit() else 600
    exited = re.search(r"exited with code (-?\d+)", raw)
    persistent = "start a persistent server (`prefect server start`) and set PREFECT_API_URL=http://127.0.0.1:4200/api"
    if exited:
        return (
            f"the temporary Prefect API server exited with code {exited.group(1)} without answering. Fix: "
            f"{persistent}; its output shows why it stops."
        )
    return (
        f"the temporary Prefect API server did not answer within {limit} s (the machine is probably busy). Fix: "
        f"allow it longer (PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS={longer}, now {limit}) or {persistent}."
    )


def _checked(preset: str, store: str | None, overrides: list[str] | None, command: str) -> PipelineConfig:
    """The resolved config, after the store and model preflight: a bad store or model fails here, in
    about a second, before Prefect is imported or its server started."""
    cfg: PipelineConfig = _run_guarded(lambda: resolve(preset, store, overrides))
    _run_guarded(lambda: preflight(cfg, command))
    r = cfg.runtime
    if (r.fanout_deployment, r.fanout_hiddens_deployment, r.fanout_evaluate_deployment) != (None, None, None):
        from flows.fanout import check_fanout  # imports Prefect: only when something fans out

        _run_guarded(lambda: check_fanout(cfg, command_stages(command)))
    return cfg


def print_results(results: Manifests) -> None:
    """Every result in graph order, each as its stage's declared report (llm_trm_core/stages/declaration.py
    `Report`): key and URI (with the files worth opening), the summary lines, the metrics as they are
    unless the report says otherwise, then the report's printed tables."""
    declared = stages()
    for label, manifest in results.items():
        found = declared.get(manifest["stage"])
        report = found.report if found else None
        files = f"  ({', '.join(report.listed_files())})" if report and report.listed_files() else ""
        console.print(f"[bold]{label}[/]  key={manifest['key']}", highlight=False)
        console.print(f"  uri: {manifest['uri']}{files}", highlight=False, soft_wrap=True)
        parsed = Manifest.model_validate(manifest)
        for line in report.lines(parsed) if report else []:
            console.print(f"  {line}", highlight=False, soft_wrap=True)
        if report is None or report.metrics:
            _print_metrics(manifest.get("metrics", {}))
        for table in report.tables_of(parsed) if report else []:
            if table.printed:
                _print_table(table.description, table.cells())


def _print_metrics(metrics: dict[str, Any]) -> None:
    rows = comparison_rows(metrics)
    if rows:
        _print_table("held-out test metrics", [{k: fmt(v) for k, v in row.items()} for row in rows])
    scalars = {k: v for k, v in flatten(metrics).items() if not k.startswith(("test.", "baselines.", "rows"))}
    if scalars:
        table = Table(show_header=False, box=None, padding=(0, 2))
        for name, value in sorted(scalars.items()):
            table.add_row(name, fmt(value))
        console.print(table)


def _print_table(title: str, cells: list[dict[str, str]]) -> None:
    table = Table(title=title, title_justify="left")
    columns = list(cells[0]) if cells else []
    for column in columns:
        table.add_column(column, justify="left" if column == columns[0] else "right")
    for row in cells:
        table.add_row(*row.values())
    console.print(table)


@app.callback()
def main_callback(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress at INFO level.")] = False,
) -> None:
    _prepare_environment()
    _configure_logging(verbose)


@app.command()
def config(preset: PresetOption = DEFAULT_PRESET, store: StoreOption = None, overrides: OverridesArg = None) -> None:
    """Print the resolved configuration (preset + overrides) as YAML."""
    cfg = _run_guarded(lambda: resolve(preset, store, overrides))
    console.print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), highlight=False)


# ---------------------------------------------------------------------------------------------
# The flow commands: one per graph command (llm_trm_core/stages/graph.py COMMANDS, its help line from
# the graph) and one per declared stage with a `command` (llm_trm_core/stages/declaration.py), each
# printing its results with `print_results`.

# command -> "module:flow", the Prefect flow that runs it (prefect.yaml deploys each: tests/test_packaging.py)
FLOWS = {
    "compressor": "flows.compressor:compressor_flow",
    "sweep": "flows.compressor:sweep_flow",
    "datagen": "flows.datagen:datagen_flow",
    "pairs": "flows.datagen:pairs_flow",
    "trm": "flows.trm:trm_flow",
    "latent": "flows.latent:latent_flow",
    "evaluate": "flows.latent:evaluate_flow",
    "grpo": "flows.grpo:grpo_flow",
    "pipeline": "flows.pipeline:pipeline",
}
STAGE_FLOW = "flows.pipeline:stage_flow"  # any declared stage, by name


def _import_flow(entry: str) -> Any:
    module, name = entry.split(":")
    return getattr(importlib.import_module(module), name)


def _flow(command: str) -> Callable[[PipelineConfig], Manifests]:
    """The Prefect flow of `command` (imported only when it runs: Prefect loads slowly)."""
    if command == "compressor-1b":
        compressor_flow = _import_flow(FLOWS["compressor"])
        return lambda cfg: compressor_flow(cfg, phase="1b")
    if command in FLOWS:
        flow: Callable[[PipelineConfig], Manifests] = _import_flow(FLOWS[command])
        return flow
    stage_flow = _import_flow(STAGE_FLOW)
    return lambda cfg: stage_flow(cfg, command)


def _run_command(command: str, preset: str, store: str | None, overrides: list[str] | None) -> Manifests:
    cfg = _checked(preset, store, overrides, command)
    flow = _flow(command)
    results: Manifests = _run_guarded(lambda: flow(cfg))
    return results


def _flow_command(command: str, help_text: str) -> None:
    def run(preset: PresetOption = DEFAULT_PRESET, store: StoreOption = None, overrides: OverridesArg = None) -> None:
        print_results(_run_command(command, preset, store, overrides))

    run.__doc__ = help_text
    app.command(name=command)(run)


for _command in COMMANDS:
    if not _command.startswith("compressor"):  # `compressor` below: one command, two phases
        _flow_command(_command, help_line(_command))


@app.command(help=help_line("compressor"))
def compressor(
    preset: PresetOption = DEFAULT_PRESET,
    store: StoreOption = None,
    overrides: OverridesArg = None,
    phase: Annotated[str, typer.Option("--phase", help="1a (plain text) or 1b (thinking traces).")] = "1a",
) -> None:
    if phase not in ("1a", "1b"):
        _print_error("error:", f"--phase must be 1a or 1b, got {phase!r}")
        raise typer.Exit(code=2)
    if phase == "1b":
        err_console.print("phase 1b: generating thinking traces first (datagen), then fine-tuning the 1a compressor")
    print_results(_run_command("compressor-1b" if phase == "1b" else "compressor", preset, store, overrides))


def add_stage_commands() -> None:
    """A command for every declared stage with a `command` (a stage declared after import: call again)."""
    taken = {c.name for c in app.registered_commands}
    for declared in stages().values():
        if declared.command and declared.command not in taken:
            _flow_command(declared.command, declared.help or f"Run stage {declared.name} and its upstream stages.")


# ---------------------------------------------------------------------------------------------
# Without Prefect: the torchrun workers' and the tests' entry


@app.command(name="stage")
def stage_command(
    name: Annotated[str, typer.Argument(help="A graph command (pipeline, trm, ...) or a declared stage.")],
    preset: PresetOption = DEFAULT_PRESET,
    store: StoreOption = None,
    overrides: OverridesArg = None,
    config_json: Annotated[
        str | None, typer.Option("--config-json", help="A resolved config as JSON (instead of --preset).")
    ] = None,
    shard: Annotated[int | None, typer.Option("--shard", help="datagen only: run only this shard index.")] = None,
) -> None:
    """Run a command or stage with everything upstream of it in this process, without Prefect (torchrun
    workers, debugging); prints its result as one JSON line (stage, key, uri, metrics, world_size). Under
    torchrun, `stage compressor` trains on every rank."""
    from llm_trm_core.launch import DIE_WITH_PARENT_ENV, die_with_parent, in_torchrun

    if os.environ.get(DIE_WITH_PARENT_ENV) == "1":
        die_with_parent()
    known = set(COMMANDS) | set(stages())
    if name not in known:
        _print_error("error:", f"unknown stage or command {name!r}; choose one of: {', '.join(sorted(known))}")
        raise typer.Exit(code=2)
    if shard is not None and name != "datagen":
        _print_error("error:", "--shard applies to `stage datagen` only")
        raise typer.Exit(code=2)
    cfg = _run_guarded(lambda: _stage_config(preset, store, overrides, config_json))
    world_size = 1  # the processes that ran the stage: this one, or every torchrun rank
    if name == "compressor" and in_torchrun():
        from llm_trm_core.stages.graph import run_compressor_distributed

        manifest, world_size, is_main = _run_guarded(lambda: run_compressor_distributed(cfg))
        if not is_main:
            return
        result = manifest.model_dump(mode="json")
    elif shard is not None:
        result = _run_guarded(lambda: _one_shard(cfg, shard))
    else:
        from llm_trm_core.stages.graph import run_plain, target_of

        result = _run_guarded(lambda: run_plain(cfg, name))[target_of(name)]
    metrics = {k: v for k, v in result["metrics"].items() if k != "history"}
    line = {"stage": result["stage"], "key": result["key"], "uri": result["uri"], "metrics": metrics}
    sys.stdout.write(json.dumps({**line, "world_size": world_size}) + "\n")


@app.command(name="units", hidden=True)
def units_command(
    kind: Annotated[str, typer.Argument(help="datagen, hiddens or evaluate.")],
    config_json: Annotated[str, typer.Option("--config-json", help="The resolved config as JSON.")],
    inputs_json: Annotated[str, typer.Option("--inputs-json", help="The units to share out, as JSON.")],
) -> None:
    """One torchrun rank's share of the generation units launched by llm_trm_core/stages/spread.py (rank r of
    N computes units r, r+N, ... on GPU r); prints what it did as one JSON line."""
    from llm_trm_core.launch import DIE_WITH_PARENT_ENV, bind_local_gpu, die_with_parent, rank_and_world
    from llm_trm_core.stages.spread import run_share

    if os.environ.get(DIE_WITH_PARENT_ENV) == "1":
        die_with_parent()
    cfg = _run_guarded(lambda: _stage_config(DEFAULT_PRESET, None, None, config_json))
    _run_guarded(lambda: bind_local_gpu(cfg.runtime))
    inputs = json.loads(Path(inputs_json).read_text())
    result = _run_guarded(lambda: run_share(cfg, kind, inputs, rank_and_world()))
    sys.stdout.write(json.dumps(result) + "\n")


def _stage_config(
    preset: str, store: str | None, overrides: list[str] | None, config_json: str | None
) -> PipelineConfig:
    if config_json is None:
        return resolve(preset, store, overrides)
    items = [*(overrides or []), *([f"store.root={store}"] if store else [])]
    try:
        base = PipelineConfig.model_validate_json(Path(config_json).read_text())
    except (OSError, ValueError) as exc:
        first = str(exc).splitlines()[0]
        raise ConfigError(f"--config-json {config_json}: not a readable resolved config ({first})") from None
    return parse_config(apply_overrides(base.model_dump(mode="json"), items)) if items else base


def _one_shard(cfg: PipelineConfig, index: int) -> dict[str, Any]:
    from llm_trm_core.stages.datagen import plan_shards
    from llm_trm_core.stages.graph import plain_call

    call = plain_call(ArtifactStore(cfg.store.root))
    problems = call("problems", cfg)
    specs = plan_shards(cfg, min(cfg.datagen.num_problems, int(problems["metrics"]["total"])))
    if not 0 <= index < len(specs):
        raise ConfigError(f"--shard {index} is out of range: this config has shards 0..{len(specs) - 1}")
    spec = specs[index]
    return call("datagen-shard", cfg, problems, spec.index, spec.start, spec.end)


@app.command()
def rehearse(
    workdir: Annotated[
        str, typer.Option("--workdir", "-w", help="Folder for the stand-ins (model, problem and corpus files).")
    ] = "rehearsal",
    store: StoreOption = None,
    layers: Annotated[int, typer.Option("--layers", help="Decoder layers of the stand-in SmolLM3 (3B has 36).")] = 2,
    json_out: Annotated[str | None, typer.Option("--json", help="Also write the per-stage table as JSON here.")] = None,
    overrides: OverridesArg = None,
) -> None:
    """Rehearse the flagship: the smollm3-3b preset end to end on local stand-ins of the same shapes (random
    SmolLM3 at hidden 2048 / vocab 128256, GSM8K-shaped file, text corpus), counts shrunk, float32 on CPU;
    prints wall time, peak RSS and rows per split for every stage."""
    import json
    from pathlib import Path

    from llm_trm_core.rehearsal import prepare_assets, rehearsal_config, rehearsal_overrides

    folder = Path(workdir).resolve()
    err_console.print(f"rehearsal: preparing stand-ins under {folder} (once: a {layers}-layer SmolLM3 at full width)")
    assets = _run_guarded(lambda: prepare_assets(folder, layers))
    root = store or f"file://{folder / 'artifacts'}"
    cfg: PipelineConfig = _run_guarded(lambda: rehearsal_config(assets, root, list(overrides or [])))
    console.print("[bold]smollm3-3b preset, changed by the rehearsal[/] (llm_trm_core/rehearsal.py)", highlight=False)
    console.print(yaml.safe_dump(rehearsal_overrides(assets), sort_keys=False), highlight=False)
    _run_guarded(lambda: preflight(cfg, "pipeline"))
    from flows.rehearse import rehearse as rehearse_flow

    results, rows, totals = _run_guarded(lambda: rehearse_flow(cfg))
    table = Table(title="rehearsal: per stage (this process)", title_justify="left")
    for column in ("stage", "runs", "state", "wall s", "peak RSS MiB", "train", "val", "test"):
        table.add_column(column, justify="left" if column in ("stage", "state") else "right")
    for row in rows:
        table.add_row(
            row.stage,
            str(row.runs),
            "/".join(row.states),
            f"{row.seconds:.1f}",
            f"{row.peak_rss / 2**20:.0f}",
            *(fmt(row.rows[s]) if row.rows[s] is not None else "-" for s in ("train", "val", "test")),
        )
    console.print(table)
    console.print(
        f"total {totals['seconds']:.0f} s, process peak RSS {totals['peak_rss'] / 2**20:.0f} MiB; store {root}",
        highlight=False,
        soft_wrap=True,
    )
    if json_out:
        payload = {
            "rows": [r.as_dict() for r in rows],
            "totals": totals,
            "keys": {k: v["key"] for k, v in results.items()},
        }
        Path(json_out).write_text(json.dumps(payload, indent=2) + "\n")


def main() -> None:
    # Only stage modules named in the environment add commands: loading the built-in declarations imports
    # every stage module (torch, transformers), seconds before a bad store or config could be refused.
    if os.environ.get(STAGE_MODULES_ENV):
        add_stage_commands()
    app(prog_name="llm-trm")


if __name__ == "__main__":
    main()

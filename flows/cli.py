"""`llm-trm`: the command line (DESIGN §8).

    llm-trm pipeline --preset local
    llm-trm config --preset tiny compressor.d_prime=32
    llm-trm <stage> --preset {tiny,local,smollm3-3b} --store URI [key=value ...]

Every command resolves one `PipelineConfig` (preset + `--store` + dotted overrides), runs the
matching Prefect flow, and prints the artifact keys, URIs and metrics.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console
from rich.table import Table

from llm_trm_core.config import PRESETS, PipelineConfig, load_config
from llm_trm_core.errors import UserError

console = Console(stderr=False)
err_console = Console(stderr=True)

app = typer.Typer(
    name="llm-trm",
    help="Tiny Recursive Models reasoning in an LLM's compressed hidden-state space, orchestrated by Prefect.",
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

# Which issue brings each stage that is not built yet.
PENDING_STAGES: dict[str, str] = {
    "compressor": "stage 1 (compressor 1a/1b)",
    "sweep": "stage 1 (the D' sweep)",
    "datagen": "stage 2 data (thinking generation)",
    "pairs": "stage 2 data (Parquet pair shards)",
    "trm": "stage 2 model (TRM training)",
    "latent": "latent reasoning at inference",
    "grpo": "stage 3 (GRPO)",
    "evaluate": "end-task evaluation",
}


def _prepare_environment() -> None:
    """Defaults that make Prefect and gcsfs behave on a fresh machine (set before they are imported)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("llm_trm_core").setLevel(logging.INFO)


def resolve(preset: str, store: str | None, overrides: list[str] | None) -> PipelineConfig:
    items = list(overrides or [])
    if store:
        items.append(f"store.root={store}")
    return load_config(preset, items)


def _run_guarded(fn: Callable[[], Any]) -> Any:
    """Run `fn`, turning user errors into a one-paragraph message and exit code 2."""
    try:
        return fn()
    except UserError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(code=2) from None


def _print_manifests(results: dict[str, dict[str, Any]]) -> None:
    for stage, manifest in results.items():
        table = Table(title=f"{stage}  key={manifest['key'][:16]}…", title_justify="left", show_header=True)
        table.add_column("metric")
        table.add_column("value", justify="right")
        for name, value in sorted(manifest.get("metrics", {}).items()):
            table.add_row(name, f"{value:.6g}" if isinstance(value, float) else str(value))
        console.print(table)
        console.print(f"  uri: {manifest['uri']}", highlight=False, soft_wrap=True)


@app.callback()
def main_callback(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress at INFO level.")] = False,
) -> None:
    _prepare_environment()
    _configure_logging(verbose)


@app.command()
def config(preset: PresetOption = "tiny", store: StoreOption = None, overrides: OverridesArg = None) -> None:
    """Print the resolved configuration (preset + overrides) as YAML."""
    cfg = _run_guarded(lambda: resolve(preset, store, overrides))
    console.print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), highlight=False)


@app.command()
def pipeline(preset: PresetOption = "local", store: StoreOption = None, overrides: OverridesArg = None) -> None:
    """Run every stage that exists, end to end, each cached by its store key."""
    cfg = _run_guarded(lambda: resolve(preset, store, overrides))
    from flows.pipeline import pipeline as pipeline_flow

    results = _run_guarded(lambda: pipeline_flow(cfg))
    _print_manifests(results)


def _pending(stage: str) -> Callable[..., None]:
    def command(preset: PresetOption = "local", store: StoreOption = None, overrides: OverridesArg = None) -> None:
        _run_guarded(lambda: resolve(preset, store, overrides))  # still validate what was typed
        err_console.print(
            f"[bold yellow]not built yet:[/] `llm-trm {stage}` arrives with {PENDING_STAGES[stage]}. "
            "`llm-trm pipeline` runs every stage that exists today.",
            highlight=False,
        )
        raise typer.Exit(code=2)

    command.__doc__ = f"{PENDING_STAGES[stage].capitalize()}: not built yet."
    return command


for _stage in PENDING_STAGES:
    app.command(name=_stage)(_pending(_stage))


def main() -> None:
    app(prog_name="llm-trm")


if __name__ == "__main__":
    main()

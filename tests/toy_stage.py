"""A toy stage, declared in this one file: importing it adds the stage to the keys, the Prefect tasks,
the graph, the `llm-trm toy` command and the `stage` flow (docs/architecture.md, "Adding a stage").

`toy` reads the problem set and counts its problems per split, scaled by a seeded random factor: it
depends on the `problems` artifact and on `runtime.seed`, and nothing else.
"""

from __future__ import annotations

import random

from llm_trm_core.config import PipelineConfig
from llm_trm_core.data.problems import read_problems
from llm_trm_core.stages.declaration import Report, Stage, Table, declare
from llm_trm_core.stages.keys import key_for, stage_config
from llm_trm_core.store import ArtifactStore, Manifest

NAME = "toy"
COLUMNS = ("split", "problems", "scaled")
EXTRA_READ: str | None = None  # tests/test_stage_reads.py sets a dotted field here: an undeclared read


def run_toy(cfg: PipelineConfig, store: ArtifactStore, problems: Manifest) -> Manifest:
    upstream = {"problems": problems.key}
    key = key_for(cfg, NAME, upstream)
    if (manifest := store.read_manifest(NAME, key)) is not None:
        return manifest
    if EXTRA_READ:
        value: object = cfg
        for part in EXTRA_READ.split("."):
            value = getattr(value, part)
    factor = random.Random(cfg.runtime.seed).random()
    counts = read_problems(store, problems).counts()
    rows = [{"split": s, "problems": n, "scaled": n * factor} for s, n in counts.items()]
    with store.writer(NAME, key, config=stage_config(cfg, NAME), code_version=TOY.version, upstream=upstream) as w:
        w.write_json("rows.json", rows)
        return w.commit({"factor": factor, "rows": rows})


TOY = declare(
    Stage(
        NAME,
        version="1",
        reads=("runtime.seed",),
        upstream=("problems",),
        run=run_toy,
        report=Report(
            "Toy counts",
            tables=lambda m: [Table("toy-counts", m.metrics["rows"], "Problems per split, scaled", COLUMNS)],
        ),
        command="toy",
        help="Count the problems per split (a toy stage declared in tests/toy_stage.py).",
    )
)

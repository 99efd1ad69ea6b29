"""Stage `problems`: the problem set (with its splits) as one Parquet file every later stage reads."""

from __future__ import annotations

import logging

import pyarrow.parquet as pq

from llm_trm_core.arrow import TABLE_WRITE_OPTIONS, read_parquet
from llm_trm_core.config import PipelineConfig
from llm_trm_core.data.problems import ProblemSet, load_problems, split_unit
from llm_trm_core.errors import UserError
from llm_trm_core.stages.keys import STAGE_CODE_VERSIONS, key_for, stage_config
from llm_trm_core.store import ArtifactStore, Manifest

logger = logging.getLogger(__name__)

STAGE = "problems"
FILE = "problems.parquet"


def run_problems(cfg: PipelineConfig, store: ArtifactStore) -> Manifest:
    key = key_for(cfg, STAGE)
    if (manifest := store.read_manifest(STAGE, key)) is not None:
        logger.info("problems: cached %s", manifest.uri)
        return manifest
    problem_set = load_problems(cfg.problems)
    if not problem_set.problems:
        raise UserError(
            f"the problem source {cfg.problems.source!r} produced no usable problems: {problem_set.rejected}"
        )
    with store.writer(STAGE, key, config=stage_config(cfg, STAGE), code_version=STAGE_CODE_VERSIONS[STAGE]) as w:
        with w.open(FILE) as f:
            pq.write_table(problem_set.to_table(), f, **TABLE_WRITE_OPTIONS)
        counts = problem_set.counts()
        return w.commit(
            {
                "source": cfg.problems.source,
                "split_unit": split_unit(cfg.problems),
                "split_units": len({p.unit for p in problem_set.problems if p.unit}),
                "total": len(problem_set.problems),
                **{f"n_{split}": n for split, n in counts.items()},
                **{f"rejected_{reason}": n for reason, n in problem_set.rejected.items()},
            }
        )


def read_problems(store: ArtifactStore, manifest: Manifest) -> ProblemSet:
    return ProblemSet.from_table(read_parquet(store.open(STAGE, manifest.key), FILE))

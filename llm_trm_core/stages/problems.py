"""Stage `problems`: the problem set (with its splits) as one Parquet file every later stage reads."""

from __future__ import annotations

import logging

import pyarrow.parquet as pq

from llm_trm_core.arrow import TABLE_WRITE_OPTIONS
from llm_trm_core.config import PipelineConfig
from llm_trm_core.data.problems import PROBLEMS_FILE, PROBLEMS_STAGE, load_problems, split_unit
from llm_trm_core.errors import UserError
from llm_trm_core.stages.publish import cached, stage_writer
from llm_trm_core.store import ArtifactStore, Manifest

logger = logging.getLogger(__name__)

STAGE = PROBLEMS_STAGE
FILE = PROBLEMS_FILE


def run_problems(cfg: PipelineConfig, store: ArtifactStore) -> Manifest:
    key, manifest = cached(cfg, store, STAGE)
    if manifest is not None:
        logger.info("problems: cached %s", manifest.uri)
        return manifest
    problem_set = load_problems(cfg.problems)
    if not problem_set.problems:
        raise UserError(
            f"the problem source {cfg.problems.source!r} produced no usable problems: {problem_set.rejected}"
        )
    with stage_writer(cfg, store, STAGE, key) as w:
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

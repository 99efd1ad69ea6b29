"""Optional Weights & Biases tracking: disabled by default, offline without network."""

from __future__ import annotations

import logging
from typing import Any

from llm_trm_core.config import TrackingConfig

logger = logging.getLogger(__name__)


class Tracker:
    """`log(metrics, step)` goes to wandb when enabled; a no-op otherwise."""

    def __init__(self, cfg: TrackingConfig, name: str, run_id: str, config: dict[str, Any]) -> None:
        self.run: Any = None
        if cfg.wandb == "disabled":
            return
        import wandb

        self.run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            name=name,
            id=run_id[:32],
            resume="allow",
            mode=cfg.wandb,
            config=config,
        )
        logger.info("wandb run %s (%s)", self.run.id, cfg.wandb)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def summary(self, metrics: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.summary.update(metrics)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None

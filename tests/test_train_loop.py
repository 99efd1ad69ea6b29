"""The shared training loop's epoch accounting: an epoch the step budget ends with is a complete epoch."""

from __future__ import annotations

import torch

from llm_trm_core.training.loop import Progress, TrainLoop, TrainState


def _loop(max_steps: int) -> TrainLoop[Progress]:
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state = TrainState(
        {"model": model}, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0), Progress()
    )
    return TrainLoop("toy", state, lr_name="lr", max_steps=max_steps)


def _run(max_steps: int, epochs: int = 3, per_epoch: int = 4) -> tuple[Progress, list[tuple[int, int]], list[int]]:
    loop = _loop(max_steps)
    seen: list[tuple[int, int]] = []
    ended: list[int] = []

    def step(batch: int, index: int) -> None:
        seen.append((loop.progress.epoch, batch))
        loop.progress.step += 1

    def end_of_epoch() -> None:
        ended.append(loop.progress.epoch)

    progress = loop.run_epochs(epochs, lambda epoch: iter(range(per_epoch)), step, end_of_epoch)
    return progress, seen, ended


def test_a_budget_that_ends_with_an_epoch_completes_that_epoch() -> None:
    progress, seen, ended = _run(max_steps=12)  # 3 epochs x 4 batches
    assert len(seen) == 12 and ended == [1, 2, 3]  # the last epoch's hook runs (validation, labelled epoch 3)
    assert (progress.epoch, progress.batch, progress.step) == (3, 0, 12)


def test_a_budget_that_ends_inside_an_epoch_leaves_it_open() -> None:
    progress, seen, ended = _run(max_steps=10)
    assert seen[-1] == (2, 1) and ended == [1, 2]  # no hook for the partial third epoch
    assert (progress.epoch, progress.batch, progress.step) == (2, 2, 10)  # a resume would skip its 2 batches

"""Stage declarations: the store keys and Prefect task names derived from them stay what they were."""

from __future__ import annotations

import pytest

from llm_trm_core.config import load_config
from llm_trm_core.plan import COMMAND_STAGES, command_stages
from llm_trm_core.stages.declaration import Stage, declare, stage_of_task, stages, task_stages
from llm_trm_core.stages.graph import COMMANDS, stages_of
from llm_trm_core.stages.keys import STAGE_CODE_VERSIONS, STAGE_SECTIONS, STAGE_VIEWS, key_for

# Keys of the tiny preset with upstream {"up": "abc"}, computed by the hand-kept tables the
# declarations replaced. A change here changes every cached artifact: only with a code version bump.
TINY_KEYS = {
    ("problems", None): "3349b9d645f1c676fc5b2202ded2d86de9c1672a8b47d07522935615864b5bde",
    ("lm-head", None): "742f65348139f43fdd2abf493eec0e0035cf13e53222cd6c21798e406f625450",
    ("hiddens", None): "da983b5ffef8d91432a0e3eb18887ee59c73390a13cb202e713aae14be5baa8a",
    ("basis", None): "33a39006753a45d03f33e4236560f650bdd7dd93234656dfad977c94740eaee7",
    ("compressor", "1a"): "409ba349818d0fbe256d81a54df0954aa62f8f3bdeeaadd55e12338955580431",
    ("compressor", "1b"): "43f7c72fa9771a5b2c0add9cd5d983a81959a6d617f7a2b273cb163630121e94",
    ("sweep", None): "3333be77468ef852b5ed597024bb3f90b825a5521cfe71bf847d95761bd7fc65",
    ("datagen-shard", None): "535d63badb450c03a1da62c5bab7868f73c45bf79158678d8317cc84e297bce2",
    ("datagen", None): "fd5d4e4ad30d12569fa31d04d1b849d56df2f01926b0edb89b7f6484cdc697e9",  # code version 3
    ("trace-hiddens", None): "06f86a21eab8c94f3dc789bbecca1cc8e2eca0a8af8011ad064ec2c8f380f515",
    ("pairs", None): "48dc535453abdd8a80f3be7e01befec96fb5a8515ded1573cb5c02876e5c4dff",
    ("trm", None): "4de5ac671a78e66ca9d21be81d31f2be23607612a4b83a76fc47da3bed43bdf5",  # code version 6
    ("latent", None): "4c488de3eeba1ce31d13a86f44453d5279b521aa53a95395b649ceff80d89935",  # code version 3
    ("evaluate", None): "f95038f522645fd509864d38685ec65b097414f70f585022e55e6cc2cc486d07",
    ("grpo", None): "ccdc61ef7d49669b477b5be073aa30d54656f06fb3a0657e18c03337a1079730",
}
# Prefect task name -> stage: tests, the UI and the cache records depend on these names.
TASK_STAGES = {
    "problems": "problems", "hiddens": "hiddens", "basis": "basis", "compressor": "compressor",
    "sweep-report": "sweep", "datagen-shard": "datagen-shard", "datagen-report": "datagen",
    "trace-hiddens": "trace-hiddens", "pairs": "pairs", "trm": "trm", "latent": "latent", "grpo": "grpo",
    "evaluate": "evaluate", "evaluate-before-grpo": "evaluate", "evaluate-after-grpo": "evaluate",
}  # fmt: skip
# The stages each command runs, as the plan listed them before the graph was declared once.
_PAIRS = ("hiddens", "basis", "compressor", "problems", "datagen", "trace-hiddens", "pairs")
BEFORE_COMMAND_STAGES = {
    "compressor": ("hiddens", "basis", "compressor"),
    "compressor-1b": _PAIRS[:-1],
    "sweep": ("hiddens", "basis", "compressor", "sweep"),
    "datagen": ("problems", "datagen"),
    "pairs": _PAIRS,
    "trm": (*_PAIRS, "trm"),
    "latent": (*_PAIRS, "trm", "latent"),
    "evaluate": (*_PAIRS, "trm", "latent", "evaluate"),
    "grpo": (*_PAIRS, "trm", "latent", "evaluate", "grpo"),
    "pipeline": (*_PAIRS, "trm", "latent", "evaluate", "grpo"),
}


def test_keys_of_a_fixed_config_do_not_change() -> None:
    cfg = load_config("tiny")
    shard = {"index": 1, "start": 8, "end": 16}

    def extra(name: str, option: str | None) -> dict[str, object] | None:
        return {"phase": option} if name == "compressor" else shard if name == "datagen-shard" else None

    found = {(name, option): key_for(cfg, name, {"up": "abc"}, extra(name, option)) for name, option in TINY_KEYS}
    assert found == TINY_KEYS


def test_the_derived_tables_cover_every_declared_stage() -> None:
    builtin = {name for name, _ in TINY_KEYS}
    assert builtin <= set(stages())
    assert {n: task_stages()[n] for n in TASK_STAGES} == TASK_STAGES
    assert set(STAGE_CODE_VERSIONS) == set(STAGE_SECTIONS) == set(stages())
    assert set(STAGE_VIEWS) == {"problems", "hiddens", "compressor", "datagen-shard"}
    assert stage_of_task("evaluate-after-grpo") is stages()["evaluate"]
    assert stage_of_task("no-such-task") is None


def test_a_second_declaration_under_a_taken_name_is_refused() -> None:
    with pytest.raises(ValueError, match="declared twice"):
        declare(Stage("trm", version="99", reads=("trm",)))
    with pytest.raises(ValueError, match="belong to another stage"):
        declare(Stage("not-trm", version="1", reads=("trm",), tasks=("trm",)))
    assert "not-trm" not in stages()


def test_the_prefect_tasks_take_the_parameters_they_always_took() -> None:
    """Parameter names enter Prefect's cache keys (tasks/caching.py): the made tasks keep the old ones."""
    import inspect

    from tasks.stage import stage_task

    old = {
        "problems": ["cfg"], "hiddens": ["cfg"], "basis": ["cfg", "hiddens"],
        "compressor": ["cfg", "hiddens", "basis", "phase", "init"], "sweep-report": ["cfg", "points"],
        "datagen-shard": ["cfg", "problems", "index", "start", "end"], "datagen-report": ["cfg", "problems", "shards"],
        "trace-hiddens": ["cfg", "datagen"], "pairs": ["cfg", "datagen", "compressor"],
        "trm": ["cfg", "pairs", "compressor"], "latent": ["cfg", "problems", "compressor", "trm"],
        "grpo": ["cfg", "problems", "compressor", "trm", "latent"],
        "evaluate-after-grpo": ["cfg", "problems", "compressor", "trm", "latent", "grpo", "before"],
    }  # fmt: skip
    for name, parameters in old.items():
        made = stage_task(name)
        assert made.name == name and list(inspect.signature(made.fn).parameters) == parameters, name


@pytest.mark.parametrize("preset", ["tiny", "smollm3-3b"])
def test_the_plan_lists_the_stages_the_graph_runs(preset: str) -> None:
    """plan.COMMAND_STAGES (light, for preflight) is what the graph calls, and what the plan listed before."""
    cfg = load_config(preset)
    assert set(COMMAND_STAGES) == set(COMMANDS) >= set(BEFORE_COMMAND_STAGES)
    for command in COMMANDS:
        derived, listed = stages_of(cfg, command), COMMAND_STAGES[command]
        assert set(derived) - {"datagen-shard"} == set(listed), (command, derived)
        assert ("datagen-shard" in derived) == ("datagen" in listed), command
        assert derived[-1] == listed[-1], command  # the command's own stage last
        assert command_stages(command) == listed
        assert BEFORE_COMMAND_STAGES.get(command, listed) == listed, command

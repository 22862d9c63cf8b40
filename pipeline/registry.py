"""The stages the runner loops over: the pipeline's own (``BUILT_IN``) and any registered
with ``register``. The driver's floor: it imports the stages (the core below them only
declares what a stage is, ``pipeline.core.stage``)."""

from __future__ import annotations

from pipeline.core.stage import Stage

# The pipeline's own stages, in the order they run. Their names are here, so that listing
# them (``--help``) imports no stage.
BUILT_IN = ("tokenize", "sft", "score", "train", "generate")
_added: list[Stage] = []


def register(stage: Stage) -> None:
    """Add a stage of your own: it runs after the pipeline's (and after those added before)."""
    if stage.name in names():
        raise ValueError(f"a stage named {stage.name!r} is registered already")
    _added.append(stage)


def unregister(name: str) -> None:
    _added[:] = [s for s in _added if s.name != name]


def built_in() -> list[Stage]:
    """The pipeline's own stages, each from the module that declares it (``STAGE``)."""
    from stages import generate, score, sft, tokenize, train  # imported when a stage is asked for, not to list names

    found = [tokenize.STAGE, sft.STAGE, score.STAGE, train.STAGE, generate.STAGE]
    assert [s.name for s in found] == list(BUILT_IN), "BUILT_IN names the stages in their order"
    return found


def registered() -> list[Stage]:
    """Every stage, in the order they run."""
    return built_in() + list(_added)


def names() -> list[str]:
    return list(BUILT_IN) + [s.name for s in _added]


def stage(name: str) -> Stage:
    found = [s for s in registered() if s.name == name]
    if not found:
        raise KeyError(f"no stage named {name!r}; registered: {names()}")
    return found[0]

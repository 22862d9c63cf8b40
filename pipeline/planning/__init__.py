"""``pipeline plan``: a config's per-rank memory and FLOPs before launch, and the settings
chosen from it (docs/plan.md).

Rooms: ``model`` (the config and its parameters on the meta device), ``memory`` (the
lines and their formulas), ``plan`` (the stages' plans, other settings, the largest row,
FLOPs), ``report`` (the text), ``auto`` (``zero_stage: auto``, the refusal before launch);
the doors are ``make_plan``, ``plan_text``, ``resolve`` and ``over_memory``."""

from .auto import over_memory, resolve
from .plan import make_plan
from .report import plan_text

__all__ = ["make_plan", "over_memory", "plan_text", "resolve"]

"""``pipeline plan``: a config's per-rank memory and FLOPs before launch (docs/plan.md).

Rooms: ``model`` (the config and its parameters on the meta device), ``memory`` (the
lines and their formulas), ``plan`` (the stages' plans, other settings, the largest row,
FLOPs), ``report`` (the text); the door is ``make_plan`` and ``plan_text``."""

from .plan import make_plan
from .report import plan_text

__all__ = ["make_plan", "plan_text"]

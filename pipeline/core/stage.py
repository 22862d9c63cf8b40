"""One door per stage: what a stage declares.

A stage is one ``Stage`` object, declared at the end of its module and registered once
in the driver's registry (``pipeline.registry``: ``BUILT_IN``, or ``register`` for a
stage of your own). The runner (``pipeline.runner``)
knows no stage by name: it plans every registered stage the config needs, in registry
order, fingerprints each from the config and its inputs' fingerprints, selects
(``--stages``, ``--from``), skips what is done, runs the rest through ``run(ctx)``, hands a
model one stage exported to the stages that load it, and writes the manifests, summary
and report.

What a stage declares:

- ``name``: its output folder, its ``--stages`` name, its row in ``status``;
- ``fingerprint_inputs(cfg, cache, fingerprints)``: what its output depends on, given the
  fingerprints of the stages planned before it;
- ``needed(cfg)``: None, or why this config has no such stage (shown by ``status``);
  ``optional``: off unless the config turns it on, so a plain run does not report it;
- ``reads(cfg, planned)``: the planned stages whose outputs it reads;
- ``models``: the model keys it loads (``ModelConfig``: ``path``, ``reference_path``,
  ``tokenizer_path``; or ``reward_model``, generate's), which its manifest records; ``loads``: those that another stage of
  the run makes when it is planned, ``{producer: key}``: an output made from another
  build of that model is refused, and a partial one cleared;
- ``export(cfg, out)``: for a stage that makes a model later stages load, its directory
  and digest; ``makes``: what that model is, in messages; ``hands_on``: the model keys it
  becomes for the stages after it;
- ``run(ctx)``: the stage itself, on Ray or in this process, returning the files its
  manifest commits and its stats; ``resumes``: a partial output is kept and resumed
  (by default it is cleared and redone);
- ``gpus(cfg)``: the GPUs the Ray cluster must have for it, by the setting that asks
  (refused on the driver where Ray would wait for them forever);
- ``preflight(cfg, use_ray)``: checks before any stage runs; ``summary(stats)``: its lines
  under the run's summary table; ``partial(dir)``: what ``status`` shows of a partial
  output; ``progress(cfg, dir)``: what ``status`` adds to its state (train's TR-DPO
  refreshes), or None; ``report(folder, result)``: its section of ``report.md`` (lines),
  its images written into the report's folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from pipeline.core.phases import PhaseClock
from pipeline.core.storage import Loc


@dataclass
class StagePlan:
    name: str
    fingerprint: str
    dir: Loc  # a local path or a URI: the run directory may be on shared storage
    inputs: dict


@dataclass
class RunContext:
    """What a stage's ``run`` is given."""

    cfg: Any  # PipelineConfig, the model names pinned, with the models earlier stages handed on
    plans: dict[str, StagePlan]  # every stage this config plans, by name
    name: str  # this stage's
    use_ray: bool
    force: bool
    models: dict = field(default_factory=dict)  # where the models it loads came from (recorded with an export)
    clock: PhaseClock = field(default_factory=PhaseClock)  # its phases: start-up, work, shutdown (core/phases.py)

    @property
    def plan(self) -> StagePlan:
        return self.plans[self.name]

    @property
    def out(self) -> Loc:
        return self.plan.dir

    def dir(self, stage: str) -> Loc:
        """Another planned stage's output."""
        return self.plans[stage].dir

    def info(self, first: str) -> dict:
        """What a stage that trains records and checks: every fingerprint, the config (model
        names pinned), this stage's fingerprint inputs, ``--force`` and the models' record;
        ``first``: the stage whose rows everything is tokenized from."""
        from pipeline.core.config import redact, to_dict

        return {"fingerprints": {s: p.fingerprint for s, p in self.plans.items()},
                "config": redact(to_dict(self.cfg)), "tokenized_dir": str(self.dir(first)),
                "inputs": self.plan.inputs, "force": self.force, "models": self.models}


def model_marker(producer: str) -> str:
    """The file in a partial output that records which build of ``producer``'s model it is
    made from (its manifest records it once the output is complete)."""
    return f"_{producer.upper()}_MODEL.json"


def _nothing(*_args) -> None:
    return None


@dataclass(frozen=True)
class Stage:
    name: str
    fingerprint_inputs: Callable[..., dict]  # (cfg, cache, {planned stage: fingerprint}) -> inputs
    run: Callable[[RunContext], tuple]  # -> (shards the manifest commits, stats)
    needed: Callable[[Any], Optional[str]] = _nothing  # cfg -> None, or why not
    optional: bool = False
    reads: Callable[[Any, set], set] = lambda cfg, planned: set()
    models: tuple[str, ...] = ()  # ModelConfig keys: "path", "reference_path", "tokenizer_path"
    loads: dict[str, str] = field(default_factory=dict)  # {producer stage: one of models}, when it is planned
    export: Optional[Callable[[Any, Loc], tuple[Loc, str]]] = None
    makes: str = ""  # what its export is, in messages ("an SFT model")
    hands_on: tuple[str, ...] = ()
    resumes: bool = False  # the safe default: a partial output is cleared, never appended to
    preflight: Callable[[Any, bool], None] = _nothing
    gpus: Callable[[Any], dict] = lambda cfg: {}  # cfg -> {the setting that asks: GPUs the cluster must have}
    summary: Callable[[dict], list[str]] = lambda stats: []
    partial: Callable[[Loc], dict] = lambda out: {}
    progress: Callable[[Any, Loc], Optional[str]] = lambda cfg, out: None
    report: Callable[[Loc, dict], list[str]] = lambda folder, result: []

    def __post_init__(self):
        # a loaded model the manifest does not record could never be checked against its producer
        unrecorded = sorted(set(self.loads.values()) - set(self.models))
        if unrecorded:
            raise ValueError(f"stage {self.name}: loads {unrecorded} from another stage but does not list them in "
                             f"models {self.models}")

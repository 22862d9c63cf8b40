"""The layout the next engineer relies on (docs/design.md, "Layout"): the train stage's
modules stay rooms, its loop reads on one screen and names no training method."""

import ast
from pathlib import Path

TRAIN = Path(__file__).resolve().parents[1] / "stages" / "train"


def test_no_train_module_is_over_300_lines():
    sizes = {p.name: len(p.read_text().splitlines()) for p in TRAIN.glob("*.py")}
    assert sizes and max(sizes.values()) <= 300, sizes


def test_no_function_of_the_worker_loop_is_over_40_lines():
    tree = ast.parse((TRAIN / "loop.py").read_text())
    long = {f.name: f.end_lineno - f.lineno + 1 for f in ast.walk(tree)
            if isinstance(f, ast.FunctionDef) and f.end_lineno - f.lineno + 1 > 40}
    assert not long, long


def test_the_loop_names_no_preference_concept():
    code = (TRAIN / "loop.py").read_text()
    tree = ast.parse(code)
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | {
        n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    dpo_words = {"pair", "pairs", "chosen", "rejected", "beta", "reference", "ref_logps", "PreferenceLoss",
                 "preference_loss", "PreferenceObjective"}
    assert not names & dpo_words, names & dpo_words


def test_the_shared_modules_import_no_training_method():
    """The loop and its helpers reach a method only through the Objective it is given."""
    shared = ["loop.py", "metrics.py", "objective.py", "checkpoints.py", "engine.py", "rows.py", "export.py"]
    imported = {}
    for name in shared:
        tree = ast.parse((TRAIN / name).read_text())
        imported[name] = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    method_modules = {"pipeline.losses", "preference", "driver"}
    assert {k: v & method_modules for k, v in imported.items() if v & method_modules} == {}


def test_the_train_stage_uses_deepspeeds_engine_through_its_front_door():
    """The log-prob pass runs as ``engine(row)`` (forward.py): DeepSpeed's own bookkeeping
    around a forward is never copied piece by piece (each copy missed the next piece:
    prefetch, then accumulation, then offload's accumulation boundary)."""
    internals = ("_backward_prologue", "clear_backward_seen_flag", "reset_step", "enter_backward",
                 "set_gradient_accumulation_boundary")
    found = {(p.name, word) for p in TRAIN.glob("*.py") for word in internals if word in p.read_text()}
    assert not found, found

"""The layout the next engineer relies on (docs/design.md, "Floors" and "Layout"): the
floors are import-linter contracts (pyproject.toml, run by ``make lint``); the training
machinery's modules stay rooms, its loop reads on one screen and names no training method."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAINING = ROOT / "pipeline" / "training"
TRAIN_STAGE = ROOT / "stages" / "train"
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


# Over 300 lines on purpose, each with its reason in docs/design.md ("Modules over 300 lines").
OVER_300 = {"pipeline/core/losses.py", "pipeline/core/formats.py"}


def test_no_module_is_over_300_lines_without_its_written_reason():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines())
             for part in ("pipeline", "stages", "cluster") for p in (ROOT / part).rglob("*.py")}
    assert len(sizes) > 50
    assert {name: n for name, n in sizes.items() if n > 300 and name not in OVER_300} == {}
    design = (ROOT / "docs" / "design.md").read_text()
    assert all(f"`{name}`" in design for name in OVER_300)


def test_no_function_of_the_worker_loop_is_over_40_lines():
    tree = ast.parse((TRAINING / "loop.py").read_text())
    long = {f.name: f.end_lineno - f.lineno + 1 for f in ast.walk(tree)
            if isinstance(f, ast.FunctionDef) and f.end_lineno - f.lineno + 1 > 40}
    assert not long, long


def test_the_loop_names_no_preference_concept():
    code = (TRAINING / "loop.py").read_text()
    tree = ast.parse(code)
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | {
        n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    dpo_words = {"pair", "pairs", "chosen", "rejected", "beta", "reference", "ref_logps", "PreferenceLoss",
                 "preference_loss", "PreferenceObjective"}
    assert not names & dpo_words, names & dpo_words


def test_the_train_stage_uses_deepspeeds_engine_through_its_front_door():
    """The log-prob pass runs as ``engine(row)`` (forward.py): DeepSpeed's own bookkeeping
    around a forward is never copied piece by piece (each copy missed the next piece:
    prefetch, then accumulation, then offload's accumulation boundary)."""
    internals = ("_backward_prologue", "clear_backward_seen_flag", "reset_step", "enter_backward",
                 "set_gradient_accumulation_boundary")
    found = {(p.name, word) for d in (TRAINING, TRAIN_STAGE) for p in d.glob("*.py") for word in internals
             if word in p.read_text()}
    assert not found, found


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """import-linter on the source tree at ``root`` (its pyproject.toml's contracts)."""
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=root, capture_output=True, text=True,
                          env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}, timeout=120)


@pytest.mark.slow
def test_the_floors_hold_and_an_import_up_breaks_them(tmp_path):
    """The contracts are kept by the code as it is; a core module that imports the driver
    (one line added to a copy of the tree) breaks the floors contract, which names it."""
    kept = lint_imports(ROOT)
    assert kept.returncode == 0 and "4 kept, 0 broken" in kept.stdout, kept.stdout + kept.stderr
    for part in ("pipeline", "stages", "cluster", "pyproject.toml"):
        copy = shutil.copytree if (ROOT / part).is_dir() else shutil.copy
        copy(ROOT / part, tmp_path / part)
    packing = tmp_path / "pipeline" / "core" / "packing.py"
    packing.write_text(packing.read_text() + "\nfrom pipeline import runner  # noqa: E402,F401\n")
    broken = lint_imports(tmp_path)
    assert broken.returncode == 1, broken.stdout
    assert "Floors: the driver, the stages, the shared machinery, cluster, the core BROKEN" in broken.stdout
    assert "pipeline.core.packing -> pipeline.runner" in broken.stdout

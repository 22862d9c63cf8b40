"""The documentation stays true to the repository: the generated configuration reference
matches pipeline/core/config/, relative links resolve to files in the repository, and no file
points at notes kept outside it. Fast: no Ray, no subprocess, no model."""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SKIP_DIRS = {".git", ".venv", "runs", "__pycache__", ".ci", ".pytest_cache", ".whl", "node_modules"}
# Built from pieces so that this file does not contain what it looks for.
OUTSIDE_REFERENCES = ("ENVIRON" + "MENT.md", "DES" + "IGN.md", "DES" + "IGN:", ".." + "/shared")


def _generator():
    spec = importlib.util.spec_from_file_location("gen_configuration", REPO / "docs" / "gen_configuration.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_configuration_reference_is_up_to_date():
    gen = _generator()
    problem = gen.check()
    assert problem is None, problem


def test_configuration_reference_lists_every_key():
    from pipeline.core import config

    text = _generator().render()
    for group in ("model", "data", "tokenize", "score", "train", "cluster"):
        cls = type(getattr(config.PipelineConfig(), group))
        for name in cls.__dataclass_fields__:
            assert f"| `{group}.{name}` |" in text, f"{group}.{name} missing from the reference"
    assert "| `train.peft.r` |" in text


def _markdown_files() -> list[Path]:
    files = [REPO / "README.md", REPO / "bench" / "README.md"] + sorted((REPO / "docs").glob("*.md"))
    return [f for f in files if f.is_file()]


LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")


def relative_links(text: str) -> list[str]:
    """Link targets that are paths in the repository (no scheme, not a bare #anchor)."""
    text = INLINE_CODE.sub("", FENCE.sub("", text))
    targets = []
    for target in LINK.findall(text):
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("#"):
            continue
        targets.append(target.split("#", 1)[0])
    return targets


def test_relative_markdown_links_point_at_files_in_the_repository():
    assert (REPO / "README.md").is_file() and (REPO / "docs").is_dir()
    broken = []
    for md in _markdown_files():
        for target in relative_links(md.read_text()):
            path = (md.parent / target).resolve()
            inside = path == REPO or REPO in path.parents
            if not inside or not path.exists():
                broken.append(f"{md.relative_to(REPO)}: {target}")
    assert not broken, "links to missing files or outside the repository: " + ", ".join(broken)


def test_link_finder_sees_links_and_skips_code():
    text = "see [a](docs/a.md#x) and [b](https://x.org)\n```\n[c](nope.md)\n```\n`[d](nope2.md)` [e](#top)"
    assert relative_links(text) == ["docs/a.md"]


def _repository_files():
    """Every file of the working tree outside SKIP_DIRS (pruned, never walked)."""
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        for name in files:
            yield Path(root) / name


def test_nothing_refers_to_notes_outside_the_repository():
    this = Path(__file__).resolve()
    found = []
    for path in _repository_files():
        if path.resolve() == this:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # binary
        for lineno, line in enumerate(text.splitlines(), 1):
            for needle in OUTSIDE_REFERENCES:
                if needle in line:
                    found.append(f"{path.relative_to(REPO)}:{lineno}: {needle}")
    assert not found, "references to files outside the repository:\n" + "\n".join(found)

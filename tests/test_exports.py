"""The top-level lazy exports: every CLI module class and the names the README's method sections use."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

import lmc_lightning
from lmc_lightning import modules

README = Path(__file__).parents[1] / "README.md"


def _section(title: str) -> str:
    """The README section whose heading contains ``title`` (up to the next heading of its level or above)."""
    text = README.read_text()
    start = text.index(title)
    level = text.rfind("\n", 0, start)
    hashes = len(text[level + 1 : start]) - len(text[level + 1 : start].lstrip("#"))
    end = re.search(rf"\n#{{1,{hashes}}} ", text[start:])
    return text[start : start + end.start()] if end else text[start:]


def test_prune_module_is_a_top_level_export() -> None:
    from lmc_lightning import PruneModule

    assert PruneModule is modules.PruneModule


def test_every_cli_module_class_is_a_top_level_export() -> None:
    concrete = {n for n in modules.__all__ if n.endswith("Module") and n not in ("LMCModule", "PathModule")}
    assert len(concrete) >= 12
    missing = sorted(n for n in concrete if getattr(lmc_lightning, n, None) is not getattr(modules, n))
    assert not missing, f"not importable from lmc_lightning: {missing}"


def test_every_export_resolves_and_is_listed() -> None:
    for name in lmc_lightning.__all__:
        assert getattr(lmc_lightning, name) is not None
    assert "PruneModule" in lmc_lightning.__all__ and "renormalize" in lmc_lightning.__all__


@pytest.mark.parametrize("title", ["(issue 14)", "(issue 15)"])
def test_the_names_of_the_issue_14_and_15_sections_are_top_level(title: str) -> None:
    """Classes ending in Module and the functions the section names bare resolve from ``lmc_lightning``."""
    section = _section(title)
    names = set(re.findall(r"\b([A-Z]\w*Module)\b", section))
    names |= {n for n in ("align_many", "evaluate_path", "renormalize", "Simplex", "EquivalenceError")
              if re.search(rf"`(?:[\w.]*\.)?{n}\b", section)}
    assert names >= {"PruneModule"} if "14" in title else names >= {"MergeModule", "align_many", "Simplex"}
    for name in sorted(names):
        assert name in lmc_lightning.__all__, f"README {title} uses {name}, not exported from lmc_lightning"
        assert getattr(lmc_lightning, name) is not None


def test_every_dotted_readme_name_resolves() -> None:
    """``lmc_lightning.a.b.c`` in the README: the longest importable module prefix, then attributes."""
    for dotted in sorted(set(re.findall(r"lmc_lightning(?:\.\w+)+", README.read_text()))):
        parts = dotted.split(".")
        for cut in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
            except ModuleNotFoundError:
                continue
            break
        for attr in parts[cut:]:
            assert hasattr(obj, attr), f"README names {dotted}, but {obj.__name__} has no {attr!r}"
            obj = getattr(obj, attr)


def test_a_bare_import_reaches_prune_as_the_module() -> None:
    """``import lmc_lightning; lmc_lightning.prune.prune`` in a fresh interpreter (the README's spelling)."""
    code = ("import lmc_lightning; m = lmc_lightning.prune; assert m.__name__ == 'lmc_lightning.prune'; "
            "assert callable(m.prune); from lmc_lightning import PruneModule; "
            "assert PruneModule.__name__ == 'PruneModule'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])

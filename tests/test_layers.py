"""The design's import layers and ruff, checked by the suite CI runs (issue 13, design step).

Layers (design.md): ``cmcr`` (CLI, service) -> ``pipeline``, ``trainer`` -> ``stores``. ``stores`` imports
neither of the others; ``pipeline`` and ``trainer`` never import each other; no room imports the CLI room
(only its shared leaves: ``cmcr`` itself for the version, ``cmcr.errors``, ``cmcr.safeload``).
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = {"cmcr", "cmcr.errors", "cmcr.safeload"}
ALLOWED = {"stores": ("cmcr.stores",), "pipeline": ("cmcr.pipeline", "cmcr.stores"),
           "trainer": ("cmcr.trainer", "cmcr.stores")}


def _cmcr_imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return [(line, m) for line, m in found if m == "cmcr" or m.startswith("cmcr.")]


def test_rooms_import_only_downwards():
    wrong = []
    for room, allowed in ALLOWED.items():
        for f in sorted((ROOT / room).rglob("*.py")):
            for line, module in _cmcr_imports(f):
                if module not in SHARED and not module.startswith(allowed):
                    wrong.append(f"{f.relative_to(ROOT)}:{line} imports {module}")
    assert not wrong, "import-layer violations (design.md, Layout):\n" + "\n".join(wrong)


def test_the_layer_check_sees_a_violation(tmp_path):
    bad = tmp_path / "x.py"
    bad.write_text("from cmcr.trainer.loop import train_connector\nimport cmcr.cli\nfrom cmcr import errors\n")
    assert [m for _, m in _cmcr_imports(bad)] == ["cmcr.trainer.loop", "cmcr.cli", "cmcr"]


@pytest.mark.skipif(shutil.which("ruff") is None and not (Path(sys.executable).parent / "ruff").exists(),
                    reason="ruff is not installed (pip install -e '.[dev]' brings it)")
def test_ruff_is_clean():
    ruff = str(Path(sys.executable).parent / "ruff") if (Path(sys.executable).parent / "ruff").exists() else "ruff"
    r = subprocess.run([ruff, "check", str(ROOT)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-1000:]

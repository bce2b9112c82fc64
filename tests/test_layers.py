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


def test_import_names_resolve_inside_the_checkout_they_were_imported_from(tmp_path):
    """A copy of the tree imports its own rooms, never the installed checkout's (issue 13, design step).

    With setuptools' package-dir mapping, ``cmcr`` came from the working directory and ``cmcr.stores``
    from whatever checkout was installed; the symlinks ``cmcr/{pipeline,trainer,stores}`` make the rooms
    plain subpackages of the ``cmcr`` that was imported.
    """
    for room in ALLOWED:
        link = ROOT / "cmcr" / room
        assert link.is_symlink() and link.resolve() == (ROOT / room).resolve(), f"cmcr/{room} must link to ../{room}"
    copy = tmp_path / "checkout"
    copy.mkdir()
    for name in ("cmcr", *ALLOWED):
        shutil.copytree(ROOT / name, copy / name, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__", "data"))
    code = ("import cmcr, cmcr.stores.store, cmcr.pipeline.encode, cmcr.trainer.loop, sys; "
            "print('\\n'.join(m.__file__ for m in (cmcr, cmcr.stores.store, cmcr.pipeline.encode, cmcr.trainer.loop)))")
    r = subprocess.run([sys.executable, "-c", code], cwd=copy, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    files = [Path(f).resolve() for f in r.stdout.split()]
    assert len(files) == 4 and all(f.is_relative_to(copy.resolve()) for f in files), files

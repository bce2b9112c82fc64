"""The docs match the code (issue 13): failure stage names, links that resolve, file names that exist,
README output blocks that a script maintains. Fast: text only, nothing is run."""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

from cmcr.stores.store import FAILURE_STAGES

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
CODE_DIRS = ("cmcr", "pipeline", "stores", "trainer")
MARKDOWN = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def _code_files() -> list[Path]:
    return [p for d in CODE_DIRS for p in sorted((ROOT / d).rglob("*.py"))]


def _without_code_blocks(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


# ----------------------------------------------------------------------------------- failure stages
def recorded_stages(files: list[Path]) -> dict[str, set[str]]:
    """``stage -> {file}`` of every failure record the code writes: a dict literal with a ``"stage"``
    string and an ``"error"`` key (progress callbacks, which have a stage but no error, are not failures)."""
    found: dict[str, set[str]] = {}
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Dict):
                continue
            keys = {k.value for k in node.keys if isinstance(k, ast.Constant)}
            if {"stage", "error"} <= keys:
                value = node.values[[getattr(k, "value", None) for k in node.keys].index("stage")]
                assert isinstance(value, ast.Constant), f"{path}: a failure record whose stage is not a literal"
                found.setdefault(value.value, set()).add(str(path.relative_to(ROOT)))
    return found


def test_failure_stages_recorded_by_the_code_are_the_documented_ones() -> None:
    found = recorded_stages(_code_files())
    assert set(found) == set(FAILURE_STAGES), (
        f"stages recorded in the code {sorted(found)} != FAILURE_STAGES {sorted(FAILURE_STAGES)}: add the new "
        f"stage to cmcr.stores.store.FAILURE_STAGES and docs/store-format.md, or use an existing one")
    assert found["read"] and all(f.startswith("pipeline/") for s in ("read", "decode", "embed", "write")
                                 for f in found[s])


def test_store_format_lists_exactly_the_failure_stages() -> None:
    text = (DOCS / "store-format.md").read_text()
    table = text.split('<a id="failure-stages"></a>', 1)[1].split("\n\n", 2)[1]
    documented = re.findall(r"^\| `([a-z_]+)` \|", table, flags=re.M)
    assert documented == list(FAILURE_STAGES)


def test_encode_docs_name_only_real_stages() -> None:
    text = (DOCS / "encode.md").read_text()
    listed = re.search(r"stage \(([a-z |]+)\)", text).group(1).split(" | ")
    assert set(listed) == set(recorded_stages(sorted((ROOT / "pipeline").rglob("*.py"))))
    for doc in MARKDOWN:
        for word in re.findall(r"`([a-z_]+)` failures?\b", doc.read_text()):
            assert word in FAILURE_STAGES, f"{doc.name} speaks of a `{word}` failure, a stage the code never records"


# ----------------------------------------------------------------------------------- links
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, markup and punctuation dropped, spaces -> ``-``."""
    text = re.sub(r"<[^>]+>", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every ``#anchor`` of a Markdown file: heading slugs (``-1``, ``-2`` for repeats) and ``<a id/name>``."""
    text = path.read_text()
    out = set(re.findall(r'<a\s+(?:id|name)="([^"]+)"', text))
    seen: dict[str, int] = {}
    for m in re.finditer(r"^#{1,6}\s+(.*?)\s*#*$", _without_code_blocks(text), flags=re.M):
        slug = github_slug(m.group(1))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def broken_links(doc: Path) -> list[str]:
    """Relative links (files and ``#anchors``) of ``doc`` that do not resolve."""
    bad = []
    for target in LINK.findall(_without_code_blocks(doc.read_text())):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.exists():
            bad.append(f"{doc.relative_to(ROOT)}: {target} (no file {dest.relative_to(ROOT)})")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{doc.relative_to(ROOT)}: {target} (no heading or <a id> {anchor!r} in {dest.name})")
    return bad


def test_every_relative_link_and_anchor_resolves() -> None:
    bad = [b for doc in MARKDOWN for b in broken_links(doc)]
    assert not bad, "dangling links:\n" + "\n".join(bad)


def test_the_link_checker_finds_dangling_links(tmp_path: Path) -> None:
    (tmp_path / "a.md").write_text("# Title\n\n## Two words\n\n<a id=\"x\"></a>\n")
    doc = tmp_path / "b.md"
    doc.write_text("[ok](a.md#two-words) [ok](a.md#x) [ok](#here) [bad](a.md#nope) [bad](c.md) [bad](#gone)\n"
                   "## Here\n```\n[in code](nowhere.md)\n```\n")
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        assert [b.split(": ", 1)[1].split(" ")[0] for b in broken_links(doc)] == ["a.md#nope", "c.md", "#gone"]
    finally:
        ROOT = saved


def test_markdown_files_named_in_docs_and_code_exist() -> None:
    """``see dependencies.md`` in a doc or a docstring must name a file of this repository."""
    known = {p.name for p in ROOT.rglob("*.md") if ".venv" not in p.parts and ".git" not in p.parts}
    bad = []
    for path in [*MARKDOWN, *_code_files()]:
        text = path.read_text()
        for name in re.findall(r"(?<![\w/.-])((?:[\w-]+/)*[\w-]+\.md)\b", text):
            if Path(name).name not in known and not name.startswith(("report", "README_cmcr")):
                bad.append(f"{path.relative_to(ROOT)}: {name}")
    assert not bad, "names of Markdown files that are not in the repository:\n" + "\n".join(sorted(set(bad)))


def test_method_sections_named_in_code_exist() -> None:
    """``method.md section 3`` / ``method.md 3`` in the code must name a numbered section of docs/method.md."""
    headings = re.findall(r"^#{2,3}\s+(\d+[a-z]?)\.", (DOCS / "method.md").read_text(), flags=re.M)
    bad = []
    for path in _code_files():
        for number in re.findall(r"method\.md(?:,)? (?:section |§)?(\d+[a-z]?)\b", path.read_text()):
            if number not in headings:
                bad.append(f"{path.relative_to(ROOT)}: method.md section {number}")
    assert not bad, "sections of docs/method.md named in the code but missing:\n" + "\n".join(sorted(set(bad)))


# ----------------------------------------------------------------------------------- generated output blocks
def _blocks_module():
    import sys

    spec = importlib.util.spec_from_file_location("make_readme_blocks", DOCS / "make_readme_blocks.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_readme_blocks"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_every_generated_block_has_its_markers_and_a_command() -> None:
    m = _blocks_module()
    assert "demo" in m.BLOCKS and m.BLOCKS["demo"].command[:2] == ("cmcr", "demo")
    for name, block in m.BLOCKS.items():
        text = (ROOT / block.doc).read_text()
        assert text.count(f"<!-- BEGIN cmcr-output:{name} -->") == 1, f"{block.doc}: BEGIN marker of {name}"
        assert text.count(f"<!-- END cmcr-output:{name} -->") == 1, f"{block.doc}: END marker of {name}"
        assert name in m.blocks_in(text), f"{block.doc}: block {name} is not BEGIN, code fence, END"
    for doc in MARKDOWN:  # no marker without a command that writes it
        for name in re.findall(r"<!-- BEGIN cmcr-output:([\w.-]+) -->", doc.read_text()):
            assert name in m.BLOCKS and m.BLOCKS[name].doc == str(doc.relative_to(ROOT)), f"{doc.name}: {name}"


def test_rewriting_a_block_is_idempotent_and_touches_nothing_else() -> None:
    m = _blocks_module()
    readme = (ROOT / "README.md").read_text()
    current = m.blocks_in(readme)["demo"]
    assert m.rewrite(readme, "demo", current) == readme  # the README holds exactly what the script writes
    raw = (ROOT / "tests" / "fixtures" / "demo_fast_output.txt").read_text()
    once = m.rewrite(readme, "demo", m.clean_output(raw))
    assert m.rewrite(once, "demo", m.clean_output(raw)) == once
    assert m.clean_output(m.blocks_in(once)["demo"]) == m.blocks_in(once)["demo"]  # cleaning is a fixed point
    before, after = readme.split("<!-- BEGIN cmcr-output:demo -->"), once.split("<!-- BEGIN cmcr-output:demo -->")
    assert before[0] == after[0] and before[1].split("<!-- END cmcr-output:demo -->")[1] == \
        after[1].split("<!-- END cmcr-output:demo -->")[1]


def test_cleaning_the_demo_output() -> None:
    m = _blocks_module()
    out = m.clean_output((ROOT / "tests" / "fixtures" / "demo_fast_output.txt").read_text())
    lines = out.splitlines()
    assert lines[0].startswith("╭") and "RANDOM WEIGHTS" in lines[0]  # the panel stays
    assert not any("━" in line or line.startswith(("WARNING", "─")) for line in lines)  # bars, logs, rules go
    assert "  audio->image   56        2             56     0.018" in out  # table rows without their boxes
    search = [line for line in lines if line.startswith("audio dog/sounds_dog_bark")]
    assert search == ["audio dog/sounds_dog_bark (label dog) → images → elephant/coco_000000519208 (elephant, "
                      "0.012), ..."]  # a wrapped search line joined, cut to its first hit
    assert lines[-1] == "RANDOM WEIGHTS: NOT MEANINGFUL: the encoders were random-init; see the notes above."
    # a line of its own after a search line is not a wrapped continuation of it (the localisation lines)
    loc = "where is the dog sound? dog/sounds_dog_bark in dog/photo: peak at (x=1, y=2) -> localization/dog.png"
    raw = "caption 'a dog' (CLIP text) → audio clips → crow/caw (crow, 0.040), dog/bark (dog, 0.03)\n" + loc + "\n"
    cut = "caption 'a dog' (CLIP text) → audio clips → crow/caw (crow, 0.040), ..."
    assert m.clean_output(raw).splitlines() == [cut, loc]
    try:
        m.rewrite("no markers here", "demo", out)
    except KeyError as e:
        assert "cmcr-output:demo" in str(e)
    else:
        raise AssertionError("rewrite of a text without markers must fail")

"""The documentation stays short, linked and current: README length, relative links, the config table."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from conftest import load_tool

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 250

_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1")
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped (hyphens kept), spaces -> hyphens."""
    text = _CODE_SPAN.sub(lambda m: m.group(2), heading)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link in a heading anchors on its text
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a markdown file, with GitHub's -1, -2 suffixes for repeated headings."""
    seen: dict[str, int] = {}
    found = set()
    for line in _prose_lines(path.read_text(encoding="utf-8")):
        match = _HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: Path) -> list[str]:
    """Link targets in a markdown file, outside code blocks and code spans."""
    targets = []
    for line in _prose_lines(path.read_text(encoding="utf-8")):
        targets += _LINK.findall(_CODE_SPAN.sub("", line))
    return targets


def broken_links(path: Path) -> list[str]:
    problems = []
    for target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http(s), mailto: not checked
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            problems.append(f"{path.relative_to(ROOT)}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{path.relative_to(ROOT)}: {target} (no heading '#{anchor}' in {dest.name})")
    return problems


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines, more than {README_MAX_LINES}: move detail into docs/")


def test_slug_follows_github_rules():
    assert slug("How the budget is spent") == "how-the-budget-is-spent"
    assert slug("Scaling out: many devices, many hosts") == "scaling-out-many-devices-many-hosts"
    assert slug("Measured: the planner against the white paper's tiers") == \
        "measured-the-planner-against-the-white-papers-tiers"
    assert slug("### `model`".lstrip("# ")) == "model"
    assert slug("Well-known  double") == "well-known--double"


def test_relative_links_resolve():
    files = _doc_files()
    assert len(files) > 1 and any(links(f) for f in files), "no markdown links found: the link check checks nothing"
    problems = [problem for path in files for problem in broken_links(path)]
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_link_check_catches_a_broken_link(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "a.md").write_text("# Title\n\n## Some section\n\n[ok](#some-section) [ok](b.md#b) "
                                   "[web](https://example.com/x.md) `[code](nowhere.md)`\n"
                                   "[bad](missing.md) [bad](#nope) [bad](b.md#title)\n"
                                   "```\n# not a heading\n[in code](nowhere.md)\n```\n", encoding="utf-8")
    (tmp_path / "b.md").write_text("# B\n", encoding="utf-8")
    problems = broken_links(tmp_path / "a.md")
    assert [p.split(": ", 1)[1].split(" (")[0] for p in problems] == ["missing.md", "#nope", "b.md#title"]


def test_config_table_is_current():
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "config_docs.py"), "--check"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr.strip() or result.stdout.strip()


def test_config_table_lists_every_schema_key_and_detects_staleness():
    from pufferfish_jax import config

    tool = load_tool("config_docs")
    document = (ROOT / "docs" / "config.md").read_text(encoding="utf-8")
    table = document.split(tool.START)[1].split(tool.END)[0]
    missing = [key for key, *_ in config.SCHEMA if f"`{key}`" not in table]
    assert not missing, f"docs/config.md's table lacks {missing}"
    for key, choices in config.CHOICES.items():
        row = next(line for line in table.splitlines() if line.startswith(f"| `{key}`"))
        assert all(f"`{choice}`" in row for choice in choices), f"{key}: allowed values missing in {row}"
    stale = document.replace(f"`{config.SCHEMA[0][0]}`", "`model.removed_key`", 1)
    assert tool.render(stale) != stale
    assert tool.render(tool.render(document)) == tool.render(document)

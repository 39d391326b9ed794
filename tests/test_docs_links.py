"""Every relative link in README.md and docs/*.md resolves, and README.md stays a front page.

A link ``[text](path)`` or ``[text](path#anchor)`` (images ``![alt](path)`` too) must name a file
or folder that exists relative to the linking file; an anchor into a markdown file must be one of
its headings under GitHub's anchor rule (lowercase, spaces to ``-``, punctuation other than ``-``
and ``_`` dropped, ``-1``, ``-2`` ... for repeated headings). ``#anchor`` alone is checked against
the linking file's own headings. http(s), mailto and other scheme links are not checked. Links
inside fenced code blocks and inline code are not links.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 250

_FENCE = re.compile(r"^\s{0,3}(`{3,}|~{3,})")
_HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
# [text](target) or [text](target "title") / [text](<target>); the text may hold one level of [...]
_LINK = re.compile(r"\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>]*>|[^\s()]+)(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
_HTML_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"", re.IGNORECASE)
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading's text (before de-duplication)."""
    parts = re.split(r"(`+[^`]*`+)", heading)  # code spans keep their text (``<dir>`` included)
    for i in range(0, len(parts), 2):  # outside code: a link's text, no inline HTML tags
        parts[i] = re.sub(r"<[^>]+>", "", re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", parts[i]))
    text = "".join(parts).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)  # \w: unicode letters, digits, underscore
    return text.replace(" ", "-")


def _prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    out, fence = [], None
    for no, line in enumerate(text.splitlines(), 1):
        m = _FENCE.match(line)
        if m:
            mark = m.group(1)
            if fence is None:
                fence = mark[0] * len(mark)
            elif mark[0] == fence[0] and len(mark) >= len(fence):
                fence = None
            continue
        if fence is None:
            out.append((no, line))
    return out


def anchors(text: str) -> set[str]:
    """Every anchor a markdown text defines: its headings (GitHub rule) and ``<a name/id>``."""
    seen: dict[str, int] = {}
    found: set[str] = set()
    for _, line in _prose_lines(text):
        found.update(_HTML_ANCHOR.findall(line))
        m = _HEADING.match(line)
        if not m:
            continue
        base = github_anchor(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def links(text: str) -> list[tuple[int, str]]:
    """(line number, target) of every markdown link outside code."""
    out = []
    for no, line in _prose_lines(text):
        for m in _LINK.finditer(_CODE_SPAN.sub("", line)):
            target = m.group(1)
            if target.startswith("<") and target.endswith(">"):
                target = target[1:-1]
            out.append((no, target.strip()))
    return out


def broken_links(path: Path) -> list[str]:
    """``file:line: target (why)`` for every relative link of ``path`` that does not resolve."""
    text = path.read_text(encoding="utf-8")
    problems = []
    for no, target in links(text):
        if not target or _SCHEME.match(target):
            continue  # http(s), mailto, ...: not checked
        file_part, _, anchor = target.partition("#")
        file_part = unquote(file_part.split("?", 1)[0])
        where = f"{path.name}:{no}: {target}"
        if file_part:
            dest = (path.parent / file_part).resolve()
            if not dest.exists():
                problems.append(f"{where} (no such file: {dest})")
                continue
        else:
            dest = path
        if anchor and dest.is_file() and dest.suffix.lower() in (".md", ".markdown"):
            if unquote(anchor).lower() not in anchors(dest.read_text(encoding="utf-8")):
                problems.append(f"{where} (no heading with anchor #{anchor} in {dest.name})")
    return problems


def _doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("path", _doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path: Path) -> None:
    assert path.exists(), path
    problems = broken_links(path)
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_readme_is_a_front_page() -> None:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines; keep it at most {README_MAX_LINES} and move depth into docs/")


def test_github_anchor_rule() -> None:
    assert github_anchor("The tutorial's formulas") == "the-tutorials-formulas"
    assert github_anchor("2025-26 methods") == "2025-26-methods"
    assert github_anchor("Python API: the algorithm library (no Lightning)") == "python-api-the-algorithm-library-no-lightning"
    assert github_anchor("`rlopt-report <sweep dir>`") == "rlopt-report-sweep-dir"
    assert github_anchor("DDP, FSDP and FSDP2") == "ddp-fsdp-and-fsdp2"
    assert github_anchor("snake_case stays") == "snake_case-stays"
    assert anchors("# A\n## A\n```\n# not a heading\n```\n") == {"a", "a-1"}


def test_checker_detects_broken_links(tmp_path: Path) -> None:
    """The checker can fail: a missing file, a missing anchor and a missing local anchor are
    reported; good links, external links and links inside code are not."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "target.md").write_text("# Target page\n\n## The tutorial's formulas\n", encoding="utf-8")
    (tmp_path / "page.md").write_text(
        "# Page\n\n## Local heading\n\n"
        "[ok](docs/target.md) [ok anchor](docs/target.md#the-tutorials-formulas) [ok local](#local-heading)\n"
        "[ok dir](docs) ![ok image](docs/target.md) [web](https://example.com/missing.md)\n"
        "`[in code](missing_in_code.md)`\n"
        "```\n[in a fence](missing_in_fence.md)\n```\n"
        "[missing file](docs/missing.md)\n"
        "[missing anchor](docs/target.md#no-such-heading)\n"
        "[missing local](#nowhere)\n"
        "![missing image](docs/missing.png)\n",
        encoding="utf-8")
    problems = broken_links(tmp_path / "page.md")
    joined = "\n".join(problems)
    assert len(problems) == 4, joined
    for bad in ("docs/missing.md", "#no-such-heading", "#nowhere", "docs/missing.png"):
        assert bad in joined
    for good in ("missing_in_code", "missing_in_fence", "example.com"):
        assert good not in joined

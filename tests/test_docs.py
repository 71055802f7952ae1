"""The docs: README.md is the front door (at most 300 lines, every relative link resolves) and docs/
is an mkdocs-material site that builds with `mkdocs build --strict` (mkdocs.yml's `validation`
turns a broken link or anchor, a page missing from the nav or an unreadable snippet into a
failure). mkdocs and mkdocs-material come with the `test` extra: when they are missing the test
fails, it does not skip, so CI cannot pass without building the site."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
README_MAX_LINES = 300

# Markdown files outside docs/ that a reader opens on a code host; their relative links must resolve.
FRONT_PAGES = [README, *sorted((ROOT / "bench").glob("**/README.md"))]

_INLINE_LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REF_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.M)
_HTML_LINK = re.compile(r"""<(?:a|img)\b[^>]*?\b(?:href|src)\s*=\s*["']([^"']+)["']""", re.I)
_FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", re.M | re.S)
_CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
_HEADING = re.compile(r"^ {0,3}#{1,6}\s+(.+?)\s*#*\s*$", re.M)


def _prose(text: str) -> str:
    """The text without fenced code blocks and code spans (a link there is not a link)."""
    return _CODE_SPAN.sub("", _FENCE.sub("", text))


def _links(text: str) -> list[str]:
    prose = _prose(text)
    return _INLINE_LINK.findall(prose) + _REF_LINK.findall(prose) + _HTML_LINK.findall(prose)


def _anchors(md: Path) -> set[str]:
    """The anchors of a Markdown file's headings, slugged as mkdocs (and, for these headings,
    GitHub) slug them: lower case, punctuation dropped, spaces to hyphens."""
    from markdown.extensions.toc import slugify  # mkdocs' own dependency

    anchors = set()
    for title in _HEADING.findall(_FENCE.sub("", md.read_text(encoding="utf-8"))):
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", title).replace("`", "")
        anchors.add(slugify(text, "-"))
    return anchors


def _is_external(target: str) -> bool:
    return bool(re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I)) or target.startswith("//")


def test_readme_is_short():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, (
        f"README.md has {n} lines, more than {README_MAX_LINES}: it is the front door; "
        "move the detail into a page of docs/ and link it"
    )


@pytest.mark.parametrize("page", FRONT_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path):
    links = _links(page.read_text(encoding="utf-8"))
    assert links or page != README, "no links found in README.md: the link pattern is broken"
    broken = []
    for target in links:
        if _is_external(target):
            continue
        path_part, _, anchor = target.partition("#")
        path_part = path_part.split("?", 1)[0]
        dest = (page.parent / path_part).resolve() if path_part else page
        if not dest.exists():
            broken.append(f"{target}: {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest} does not exist")
        elif not dest.is_relative_to(ROOT):
            broken.append(f"{target}: points outside the repository")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading of {dest.relative_to(ROOT)} has the anchor #{anchor}")
    assert not broken, f"{page.relative_to(ROOT)}: broken relative links:\n" + "\n".join(broken)


def test_docs_build_strict(tmp_path: Path):
    missing = [name for name in ("mkdocs", "material") if importlib.util.find_spec(name) is None]
    if missing:
        pytest.fail(
            f"{', '.join(missing)} not installed: the docs site cannot be checked. "
            "Install the test tools: pip install -e '.[test]'"
        )
    site = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
         "--site-dir", str(site)],
        cwd=ROOT,  # snippets (`--8<-- "params.yaml"`) are read from the project root
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},  # Material's banner about MkDocs 2.0
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"mkdocs build --strict failed (exit {proc.returncode}):\n{log}"
    problems = [ln for ln in log.splitlines() if re.match(r"^(WARNING|ERROR)\b", ln)]
    assert not problems, "mkdocs build printed warnings or errors:\n" + "\n".join(problems)
    # Every page of docs/ became a page of the site (omitted_files in mkdocs.yml makes a page left
    # out of the nav a warning; this checks the build wrote them).
    for md in sorted((ROOT / "docs").glob("**/*.md")):
        rel = md.relative_to(ROOT / "docs").with_suffix("")
        html = site / (rel.parent if rel.name == "index" else rel) / "index.html"
        assert html.is_file(), f"docs/{md.relative_to(ROOT / 'docs')} was not built into the site"

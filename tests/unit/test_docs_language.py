"""The product speaks about the product: no development narration in the docs, docstrings or comments.

Phrases such as "this stop", "last round" or "issue #3" tell how the project was built, not what it does; they
belong in commit messages and in CHANGELOG.md (history by version), which is exempt. Docs are checked whole;
Python files in their comments and string literals (docstrings, help texts). A failure lists file:line.
"""

from __future__ import annotations

import io
import re
import tokenize
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

PHRASES = ("this stop", "last stop", "this round", "last round", "this session", "the issue", "two stops ago",
           "earlier stops", "issue #", "re-measured this", "until this round")


def _pattern(phrase: str) -> str:
    # whole words only: "this round" must not match "this round-robin" (BBTv2's schedule)
    head = r"(?<![\w-])"
    tail = r"(?![\w-])" if phrase[-1].isalnum() else ""
    return head + re.escape(phrase) + tail


NARRATION = re.compile("|".join(_pattern(p) for p in PHRASES), re.IGNORECASE)

#: Markdown checked whole. README.md is not listed yet: it is being rewritten from docs/ and joins this list then.
DOC_FILES = [REPO / "README.md", REPO / "bbt_client" / "data" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
CODE_DIRS = ("bbt_client", "server_stub", "benchmarks", "examples")


def _text_hits(path: Path, text: str, first_line: int = 1) -> list[str]:
    hits = []
    for offset, line in enumerate(text.splitlines()):
        m = NARRATION.search(line)
        if m:
            hits.append(f"{path.relative_to(REPO)}:{first_line + offset}: {m.group(0)!r} in {line.strip()[:100]}")
    return hits


def _python_hits(path: Path) -> list[str]:
    """Hits in comments and string literals (docstrings, help texts), not in identifiers."""
    hits = []
    source = path.read_text(encoding="utf-8")
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in (tokenize.COMMENT, tokenize.STRING) or tok.type == getattr(tokenize, "FSTRING_MIDDLE", -1):
            hits += _text_hits(path, tok.string, tok.start[0])
    return hits


def test_phrases_match_narration_only():
    assert NARRATION.search("re-measured this stop")
    assert NARRATION.search("See issue #3.")
    assert NARRATION.search("the issue's targets")
    assert NARRATION.search("This Round")
    assert not NARRATION.search("visited in this round-robin until the budget is spent")
    assert not NARRATION.search("the nonstop server")


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: p.name)
def test_docs_do_not_narrate_development(path):
    hits = _text_hits(path, path.read_text(encoding="utf-8"))
    assert not hits, "development narration in docs:\n" + "\n".join(hits)


def test_code_comments_and_docstrings_do_not_narrate_development():
    hits = []
    for folder in CODE_DIRS:
        for path in sorted((REPO / folder).rglob("*.py")):
            hits += _python_hits(path)
    assert not hits, "development narration in comments or strings:\n" + "\n".join(hits)

"""docs/performance.md holds the current figures and links each to its round in docs/performance_history.md: every
such link must land on a heading there (the history was moved whole, so its headings keep their anchors)."""
from __future__ import annotations

import re
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs"


def github_anchor(heading: str) -> str:
    """The id GitHub gives a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_link_into_the_history_lands_on_a_heading():
    history = (DOCS / "performance_history.md").read_text()
    anchors = {github_anchor(line.lstrip("#")) for line in history.splitlines() if line.startswith("#")}
    links = re.findall(r"performance_history\.md#([\w\-]+)", (DOCS / "performance.md").read_text())
    assert len(links) >= 10
    assert not [a for a in links if a not in anchors], "links from performance.md to missing history headings"


def test_the_history_keeps_every_round():
    history = (DOCS / "performance_history.md").read_text()
    for ordinal in ("Second", "Third", "Fourth", "Fifth", "Sixth", "Seventh", "Eighth", "Ninth"):
        assert f"## {ordinal} round" in history

"""docs/configuration.md is generated from the pydantic models (tools/config_reference.py): it must be what the
generator writes today, every field of every config section must have a description, and every field and
strategy must be on the page."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from conftest import load_repo_script
from forgetless.config import ExperimentConfig
from forgetless.strategies import available_strategies

REPO = Path(__file__).resolve().parent.parent
PAGE = REPO / "docs" / "configuration.md"


REFERENCE = load_repo_script("tools/config_reference.py")


def test_every_config_field_has_a_description():
    missing = REFERENCE.undocumented_fields()
    assert not missing, (f"config fields without a description: {missing}; give each a Field(description=...) and "
                         f"regenerate the page: {REFERENCE.REGENERATE}")


def test_the_committed_page_is_the_generated_one():
    generated = REFERENCE.reference_page()
    committed = PAGE.read_text() if PAGE.exists() else ""
    changed = [line for line in generated.splitlines() if line not in committed.splitlines()][:3]
    assert committed == generated, (f"docs/configuration.md is stale (e.g. {changed}); regenerate it with: "
                                    f"{REFERENCE.REGENERATE}")


def test_the_page_lists_every_field_of_every_section_and_every_strategy():
    page = PAGE.read_text()
    sections = REFERENCE.model_sections(ExperimentConfig)
    for model in sections:
        assert f"## {model.__name__}" in page
        for name in model.model_fields:
            assert f"| `{name}` |" in page, f"{model.__name__}.{name} is not on the page"
    for strategy in available_strategies():
        assert f"### {strategy}\n" in page
    # the sections that appear in several places say so, and nested sections are reached through unions and lists
    task = next(m for m in sections if m.__name__ == "TaskConfig")
    assert {"source", "targets[]"} <= set(sections[task])
    transform = next(m for m in sections if m.__name__ == "TaskTransform")  # under every place a task appears
    assert {"source.transforms[]", "targets[].transforms[]"} <= set(sections[transform])
    assert any(m.__name__ == "RangeSpec" for m in sections)  # inside search.space's mapping values


class _Sample(BaseModel):
    """A sample section."""

    count: int = Field(3, gt=0, description="how many")
    mode: Literal["fast", "slow"] = Field("fast", description="which way")
    where: str | None = Field(None, description="a place")


def test_a_row_shows_type_bounds_default_description_and_an_example():
    rows = REFERENCE.field_rows(_Sample, ["sample"], [("x.yaml", {"sample": {"where": "s3://b/p"}})])
    assert rows[2] == "| `count` | int, > 0 | `3` | how many | `3` (the default) |"
    assert rows[3] == '| `mode` | "fast" \\| "slow" | `fast` | which way | `slow` |'
    assert rows[4] == "| `where` | str \\| null | `null` | a place | `s3://b/p` (x.yaml) |"

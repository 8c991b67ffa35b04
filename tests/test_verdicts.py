"""The reproduction verdicts in docs/ are what the result JSON says (benchmarks/verdicts.py), and the verdict rule
decides on the paired interval: a number typed into a generated block, or a result file changed without
regenerating the docs, fails here."""
from pathlib import Path

import pytest

from conftest import load_repo_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def verdicts():
    return load_repo_script("benchmarks/verdicts.py")


def test_every_generated_block_in_docs_matches_its_result_file(verdicts):
    stale = verdicts.stale_blocks()
    assert not stale, f"regenerate with: python benchmarks/verdicts.py ({stale})"


def test_docs_hold_a_block_for_every_claim_with_results(verdicts):
    text = "".join(p.read_text() for p in (ROOT / "docs").glob("*.md"))
    missing = [name for name in verdicts.blocks() if f"<!-- generated:{name} -->" not in text]
    assert not missing, f"claims with results but no place in docs/: {missing}"


def test_a_planted_number_is_caught(verdicts, tmp_path):
    generated = verdicts.blocks()
    name, body = next(iter(generated.items()))
    page = tmp_path / "page.md"
    page.write_text(f"intro\n<!-- generated:{name} -->\n{body}<!-- /generated:{name} -->\n")
    assert verdicts.stale_blocks(tmp_path, generated) == []
    digits = [i for i, ch in enumerate(body) if ch.isdigit()]
    i = digits[len(digits) // 2]
    planted = body[:i] + str((int(body[i]) + 1) % 10) + body[i + 1:]
    page.write_text(f"intro\n<!-- generated:{name} -->\n{planted}<!-- /generated:{name} -->\n")
    assert verdicts.stale_blocks(tmp_path, generated) == [f"page.md: {name}"]


def test_verdict_rule_reads_the_paired_interval(verdicts):
    C = verdicts.Comparison
    better = C("a − b", "acc", [0.80, 0.82, 0.81, 0.83, 0.80], [0.70, 0.71, 0.72, 0.70, 0.71], +1)
    assert better.verdict() == "reproduced"
    assert C("a − b", "acc", better.a, better.b, -1).verdict() == "not reproduced"
    noisy = C("a − b", "acc", [0.80, 0.60, 0.75], [0.70, 0.72, 0.74], +1)
    assert noisy.verdict() == "inconclusive"
    claim = verdicts.Claim("x", "t", "f.json", [better, noisy])
    assert claim.verdict() == "inconclusive"
    assert verdicts.Claim("x", "t", "f.json", [better, C("", "", better.a, better.b, -1)]).verdict() == "not reproduced"


def test_standard_metrics_from_a_hand_computed_matrix(verdicts):
    # source then two targets; rows: before, after target 1, after target 2
    R = [[0.90, 0.10, 0.20],
         [0.80, 0.70, 0.15],
         [0.60, 0.50, 0.90]]
    assert verdicts.acc_targets(R) == pytest.approx((0.50 + 0.90) / 2)
    assert verdicts.source_forgetting(R) == pytest.approx(0.90 - 0.60)
    # tasks 0 and 1: (0.90 - 0.60) and (0.70 - 0.50), averaged
    assert verdicts.chaudhry_forgetting(R) == pytest.approx((0.30 + 0.20) / 2)

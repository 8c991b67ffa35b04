"""Docs cannot drift: every metric name README.md, cluster/README.md and docs/*.md mention in backticks is a name
forgetless logs or its Python API uses, and every set-up line of their shell blocks is the README's set-up (`make ...`).

The names come from the code, never from a list kept here: the summary metrics from their one list
(analysis/metric_names.py SUMMARY_METRICS: Python API keys and MLflow names), every other name from the string
literals of forgetless's sources (the curves are f-strings there: `f"{prefix}val/task/{name}/acc"`), and, in the e2e
test, from what a small real compare actually logged into its MLflow store. The checker itself is tested on planted
wrong names."""
from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

import pytest

from forgetless.platform.analysis import metric_names

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "cluster" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
OLD_NAMES_PAGE = ROOT / "docs" / "metrics.md"  # the one page that lists the names of runs logged before the rename
# MLflow's own metric families (system metrics): not forgetless's names
MLFLOW_FAMILIES = ("system/",)
CURVE_PREFIX = "pretrain/"  # train_loop.curve_prefix: the pre-training run's curves
# first path segments that are metric placeholders in the docs (`<label>/<metric>/mean`)
PLACEHOLDER = re.compile(r"<[^>/]+>")
SETUP_COMMAND = re.compile(r"^\s*(?:\$\s*)?(pip3? install|python3? -m pip install|python3? -m venv|uv (?:sync|venv|pip "
                           r"install)|poetry install|conda (?:create|install|env create)|make\b)")


# ---------------------------------------------------------------------------------------------------------------------
# reading the docs


def prose(text: str) -> str:
    """The text outside fenced code blocks."""
    return re.sub(r"(?ms)^```.*?^```", "", text)


def shell_blocks(text: str) -> list[str]:
    return re.findall(r"(?ms)^```(?:bash|sh|shell|console)?\n(.*?)^```", text)


def summary_names() -> set[str]:
    """The code's one list of summary metrics: Python API keys (fractions) and MLflow names, today's and old."""
    names = set()
    for table in (metric_names.SUMMARY_METRICS, metric_names.OLD_SUMMARY_METRICS):
        for key, (mlflow_name, _) in table.items():
            names |= {key, mlflow_name}
    return names


def old_names() -> set[str]:
    old = set(metric_names.OLD_ONLY_NAMES) | set(metric_names.OLD_REDEFINED)
    old |= {name for _, (name, _) in metric_names.OLD_SUMMARY_METRICS.items()}
    return old - {name for _, (name, _) in metric_names.SUMMARY_METRICS.items()} - set(metric_names.SUMMARY_METRICS)


def metric_roots(known: set[str]) -> set[str]:
    """The first segments of the known names, and the one-word names (`acc_pct`: `<label>/acc_pct/mean`)."""
    return {n.split("/")[0] for n in known}


def metric_like(span: str, roots: set[str]) -> bool:
    """Whether a backticked span names a metric: a path of metric-name characters whose first segment is a metric's
    (or a placeholder such as `<label>`), or one word with a unit suffix (`acc_pct`, `bwt_pp`)."""
    if re.fullmatch(r"[a-z][a-z0-9_]*_(pct|pp)", span):
        return True
    if not re.fullmatch(r"[a-z0-9_<>*/.]+", span) or "/" not in span or re.search(r"(?<!\.)\.(?!\.)", span):
        return False  # a file, a module path, a config field
    first, *rest = span.split("/")
    if PLACEHOLDER.fullmatch(first):  # `<label>/<metric>/mean`, not `<venv>/torch_extensions`
        return all(PLACEHOLDER.fullmatch(seg) or seg in roots or seg in ("mean", "sd", "n") for seg in rest)
    return first in roots


def doc_metric_names(text: str, roots: set[str]) -> list[str]:
    return [s for s in re.findall(r"`([^`\n]+)`", prose(text)) if metric_like(s, roots)]


# ---------------------------------------------------------------------------------------------------------------------
# what the code logs


@lru_cache(maxsize=1)
def source_templates() -> tuple[tuple[str, ...], ...]:
    """Every string literal of forgetless's sources that has the shape of a metric name, as segments; an f-string's
    `{...}` is a wildcard segment (`f"{split}/task/{name}/perplexity"`), a leading `{prefix}` glued to the first
    segment (the `pretrain/` of the pre-training's curves) is optional. Literals with no plain segment say nothing."""
    found = set()
    for path in sorted((ROOT / "forgetless").rglob("*.py")):
        for literal in re.findall(r"[\"']([^\"'\s]*/[^\"'\s]*)[\"']", path.read_text()):
            literal = re.sub(r"^\{[^{}/]*\}(?=[^/])", "", literal)
            segments = tuple("{}" if "{" in seg else seg for seg in literal.split("/"))
            if any(seg != "{}" for seg in segments) and all(re.fullmatch(r"[a-z0-9_{}]+", seg) for seg in segments):
                found.add(segments)
    return tuple(sorted(found))


def _pattern(name: str) -> str:
    """A documented name as a regex over logged names: `<x>` one segment, a trailing `*` or `...` any rest."""
    out = ""
    for part in re.split(r"(<[^>]+>|\*|\.\.\.)", name):
        out += r"[^\s\"'/]+" if part.startswith("<") else r"[^\s\"']*" if part in ("*", "...") else re.escape(part)
    return out


def _segments_match(doc: list[str], template: tuple[str, ...]) -> bool:
    if doc and doc[-1] in ("*", "..."):
        return len(template) >= len(doc) - 1 and _segments_match(doc[:-1], template[:len(doc) - 1])
    return len(doc) == len(template) and all(
        d == t or t == "{}" or PLACEHOLDER.fullmatch(d) for d, t in zip(doc, template))


def in_sources(name: str) -> bool:
    """The name is one forgetless's sources spell (a literal, or an f-string whose `{...}` stand for segments)."""
    if name.startswith(CURVE_PREFIX) and in_sources(name[len(CURVE_PREFIX):]):
        return True  # the pre-training's curves: the same names under the prefix the f-strings glue on
    doc = name.split("/")
    # a family the code builds in two steps (`as_metrics(scores, f"{prefix}val/eval")` adds `/{name}/{metric}`):
    # a spelled prefix of two or more segments, then placeholders only
    heads = [doc[:k] for k in range(len(doc), 1, -1) if all(PLACEHOLDER.fullmatch(d) for d in doc[k:])]
    return any(_segments_match(head, t) for head in heads for t in source_templates())


def aggregate_of_summary(name: str, summary: set[str]) -> bool:
    """`<label>/<summary metric>/mean|sd` and `<label>/n`: the parent run's aggregates over seeds."""
    parts = name.split("/")
    if len(parts) == 2 and parts[1] == "n":
        return True
    inner = "/".join(parts[1:-1])
    return len(parts) >= 3 and parts[-1] in ("mean", "sd") and (inner in summary or bool(PLACEHOLDER.fullmatch(inner)))


def unknown_names(text: str, logged: set[str] = frozenset(), allow_old: bool = False) -> list[str]:
    """The metric names `text` mentions in backticks that forgetless neither logs nor uses (wrong or drifted);
    `logged`: names a real run logged (checked against as they are, placeholders matching one segment)."""
    summary = summary_names()
    old = old_names()
    known = summary | set(logged)
    wrong = []
    for name in doc_metric_names(text, metric_roots(known | {"val/", "test/", "train/", "pretrain/"})):
        if name.startswith(MLFLOW_FAMILIES) or aggregate_of_summary(name, summary):
            continue
        if name in old:
            if not allow_old:
                wrong.append(name)
            continue
        if name in summary or any(re.fullmatch(_pattern(name), n) for n in logged) or in_sources(name):
            continue
        wrong.append(name)
    return wrong


def setup_problems(text: str, allowed_targets: set[str]) -> list[str]:
    """Set-up lines of the text's shell blocks that are not one of the README's `make` targets."""
    bad = []
    for block in shell_blocks(text):
        for line in block.splitlines():
            if not SETUP_COMMAND.match(line):
                continue
            target = re.match(r"\s*(?:\$\s*)?make\s+([\w-]+)", line)
            if target is None or target.group(1) not in allowed_targets:
                bad.append(line.strip())
    return bad


def readme_setup_targets() -> set[str]:
    """The make targets the README names, and what they run first (their Makefile prerequisites: `demo: setup`)."""
    named = set(re.findall(r"\bmake ([\w-]+)", (ROOT / "README.md").read_text()))
    rules = dict(re.findall(r"(?m)^([\w-]+):\s*(.*)$", (ROOT / "Makefile").read_text()))
    return named | {dep for t in named for dep in rules.get(t, "").split() if dep in rules}


# ---------------------------------------------------------------------------------------------------------------------
# tests


def test_the_checker_finds_planted_wrong_names():
    text = ("Per epoch: `val/target/acc`, `val/task/<name>/acc`, `forgetting/max_pp`, `acc_pct`, `source/forgetting`, "
            "`<strategy>/acc_pct/mean`, `system/...`; files `cluster/README.md`, config `train.lr`.\n"
            "Wrong: `val/target/accuracy`, `forgetting/max_pct`, `source/acc_after_pp`, `bwt_percent_pp`.\n"
            "```bash\nforgetless compare x.yaml  # `not/checked` in a code block\n```\n")
    assert unknown_names(text) == ["val/target/accuracy", "forgetting/max_pct", "source/acc_after_pp",
                                   "bwt_percent_pp"]
    assert unknown_names("an old run's `forgetting/first_pp`") == ["forgetting/first_pp"]
    assert unknown_names("an old run's `forgetting/first_pp`", allow_old=True) == []


def test_the_setup_check_finds_a_pip_install():
    text = "```bash\npip install -e \".[test]\"\nmake setup\nmake nonsense\nforgetless demo\n```\n"
    targets = readme_setup_targets()
    assert {"demo", "test", "setup"} <= targets  # `make demo` runs `make setup` first (the Makefile says so)
    assert setup_problems(text, targets) == ['pip install -e ".[test]"', "make nonsense"]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_metric_name_in_the_docs_is_one_forgetless_logs(doc):
    assert unknown_names(doc.read_text(), allow_old=doc == OLD_NAMES_PAGE) == []


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_setup_line_is_the_readmes(doc):
    assert setup_problems(doc.read_text(), readme_setup_targets()) == []


# slow tier (make test-all): CI's 15-minute budget (docs/performance.md); run and reported in the stop's closing note
@pytest.mark.slow
@pytest.mark.e2e
def test_the_names_a_real_run_logs_are_the_checkers(ray_session, workdir, tiny_config):
    """A small compare (pre-training and a strategy) into a fresh MLflow store: every name its runs hold is one the
    checker knows from the code (so the fast tests above check against what is logged), and the docs pass against
    the logged names themselves."""
    import forgetless
    from mlflow.tracking import MlflowClient

    cfg = tiny_config(scaling={"num_workers": 1}, train={"epochs": 1, "lr": 0.01, "batch_size": 64},
                      pretrain={"epochs": 1, "checkpoint_every": 1, "lr": 0.01, "batch_size": 64})
    out = forgetless.compare(cfg)
    c = MlflowClient(out.tracking_uri)
    logged = {k for r in c.search_runs([out.experiment_id]) for k in r.data.metrics}
    assert {"val/target/acc", "val/source/acc", "train/loss", "pretrain/val/source/acc", "forgetting/max_pp"} <= logged
    summary = summary_names()
    task_curve = re.compile(r"(pretrain/)?(val|test)/task/[^/]+/(acc|loss)")  # one per task: its name is data
    unknown = [k for k in logged if not k.startswith(MLFLOW_FAMILIES) and k not in summary
               and not task_curve.fullmatch(k) and not in_sources(k)]
    assert unknown == []
    for doc in DOCS:
        assert unknown_names(doc.read_text(), logged, allow_old=doc == OLD_NAMES_PAGE) == [], doc.name

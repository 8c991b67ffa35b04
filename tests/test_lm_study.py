"""The language-model study (benchmarks/lm_study.py, issue 30 item 4) and its search counterpart (pareto_study.py
--study lm, issue 31 item 5b): the front is chosen on validation and reported on test, the paired statistics are the
platform's, a run trains the strategies through the platform's own pieces, and the example config loads."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from conftest import load_repo_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study():
    return load_repo_script("benchmarks/lm_study.py")


def _curve(step_values: list[tuple[int, float, float, float, float]]) -> list[dict]:
    """(step, val code, val prose, test code, test prose) -> curve points."""
    return [{"step": s, "val_target_loss": vt, "val_source_loss": vs, "test_target_loss": tt,
             "test_source_loss": ts, "mc_acc": 0.3} for s, vt, vs, tt, ts in step_values]


def _report(runs: list[dict]) -> dict:
    pre = {"step": 0, "val_target_loss": 6.0, "val_source_loss": 5.0, "test_target_loss": 6.0,
           "test_source_loss": 5.0, "mc_acc": 0.35}
    return {"protocol": {"steps": 20, "batch_size": 8, "block_size": 128, "eval_every": 10, "eval_blocks": 16,
                         "mc_items": 40},
            "settings": {r["label"]: {} for r in runs}, "ewc_lambda": 100.0, "ewc_fisher_sum": 1.0,
            "pretrained": pre, "reference": "full_1e-3", "runs": runs}


def _run(label: str, seed: int, points, seconds: float = 1.0) -> dict:
    return {"label": label, "seed": seed, "curve": _curve(points), "train_seconds": seconds}


def test_the_front_is_chosen_on_validation_and_reported_with_test_numbers(study):
    # "a" is better on validation at step 20 (lower code loss at equal forgetting), "b" would be on test
    runs = []
    for seed, jitter in ((0, 0.0), (1, 0.01), (2, -0.01)):
        runs += [_run("full_1e-3", seed, [(10, 5.5, 5.4, 5.5, 5.4), (20, 5.2 + jitter, 5.5, 5.2 + jitter, 5.5)]),
                 _run("a", seed, [(10, 5.6, 5.1, 5.6, 5.1), (20, 5.3, 5.2, 5.35, 5.2)]),
                 _run("b", seed, [(10, 5.9, 5.3, 5.9, 5.3), (20, 5.31, 5.2, 5.30, 5.2)])]
    report = _report(runs)
    a = study.analyse(report)
    on_front = {(a["points"][i]["label"], a["points"][i]["step"]) for i in a["front"]}
    # the pre-trained model forgets nothing: on the front by construction; b@20 is dominated by a@20 on validation
    assert on_front == {("pre-trained", 0), ("a", 10), ("a", 20), ("full_1e-3", 20)}
    assert not a["test_front_agrees"]  # on test, b@20 would have beaten a@20
    a20 = next(p for p in a["points"] if p["label"] == "a" and p["step"] == 20)
    assert a20["test_target"] == pytest.approx(5.35) and a20["val_target"] == pytest.approx(5.3)
    assert a20["test_forgetting"] == pytest.approx(0.2)  # prose 5.2 - 5.0, from the pre-trained model
    block = study.docs_blocks(report)["lm-study"]
    assert "| a | 20 | 5.300 | +0.200 | 5.350 ± 0.000 | +0.200 ± 0.000 |" in block
    assert "Never on the front (at any step): b." in block


def test_paired_statistics_against_full_fine_tuning_are_the_platforms(study):
    runs = []
    for seed, d in ((0, 0.18), (1, 0.20), (2, 0.22)):
        runs += [_run("full_1e-3", seed, [(20, 5.2, 5.5, 5.2, 5.5)]),
                 _run("replay_25%", seed, [(20, 5.2, 5.5 - d, 5.2 + d / 10, 5.5 - d)])]
    diffs = {(d["label"], d["metric"]): d for d in study.paired(_report(runs))}
    prose = diffs[("replay_25%", "prose_loss_increase")]
    # differences -0.18, -0.2, -0.22: mean -0.2, sd 0.02, t = -0.2 / (0.02 / sqrt 3) with 2 degrees of freedom
    assert prose["mean"] == pytest.approx(-0.2) and prose["sd"] == pytest.approx(0.02) and prose["n"] == 3
    from scipy import stats
    assert prose["p_value"] == pytest.approx(2 * stats.t.sf(0.2 / (0.02 / 3 ** 0.5), 2))
    assert prose["verdict"] == "better"
    assert diffs[("replay_25%", "code_loss")]["verdict"] == "worse"  # +0.018 to +0.022 nats: learns less
    assert diffs[("replay_25%", "mc_forgetting")]["verdict"] == "not shown"  # every difference 0
    text = study.docs_blocks(_report(runs))["verdict-lm-study"]
    assert "Forgets less prose than full_1e-3 (shown): replay_25%; learns less code (shown): replay_25%." in text


def test_ewc_lambda_comes_from_the_fisher_not_the_results(study):
    # lambda/2 * sum F * (1e-2)^2 = 1 nat  ->  lambda = 2 / (sum F * 1e-4), rounded to a power of ten
    assert study.choose_ewc_lambda(2.0) == 1e4
    assert study.choose_ewc_lambda(0.02) == 1e6


@pytest.mark.slow  # 29-83 s on the 2 shared cores (building the two corpora's blocks, four tiny runs)
def test_a_run_trains_each_kind_of_setting_through_the_platforms_pieces(study, tmp_path):
    """Replay (data mixing), EWC (Fisher from prose training blocks) and LoRA on a tiny decoder, 4 steps each."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_language_models import make_tiny_decoder

    from forgetless.config import load_config
    from forgetless.data import build_stream

    folder = make_tiny_decoder(tmp_path / "tiny-gpt2")
    cfg = study.experiment(str(folder), 32, 4, 4, 8)
    cfg["targets"][0]["max_train_blocks"] = 24
    loaded = load_config(cfg)
    tasks_file = str(tmp_path / "tasks.pt")
    study.save_tasks(build_stream(loaded.source, loaded.targets), tasks_file)
    grid = study.settings(ewc_lambda=100.0)
    pre = study.pretrained_point(cfg, tasks_file)
    runs = {label: study.run_one(cfg, label, grid[label], 0, 4, 2, tasks_file)
            for label in ("full_1e-3", "replay_25%", "ewc", "lora_r8")}
    for label, run in runs.items():
        assert [p["step"] for p in run["curve"]] == [2, 4], label
        assert 0.0 <= run["curve"][-1]["mc_acc"] <= 1.0
    # replay trains on the same code batches plus prose: its prose loss moves differently from plain fine-tuning's
    assert runs["replay_25%"]["curve"][-1]["val_source_loss"] != runs["full_1e-3"]["curve"][-1]["val_source_loss"]
    assert runs["lora_r8"]["trainable"] < runs["full_1e-3"]["trainable"]
    assert all(p["val_target_loss"] < pre["val_target_loss"] for p in runs["full_1e-3"]["curve"])


def test_the_example_loads_and_every_strategy_applies_to_language_models(tmp_path):
    from forgetless.config import load_config
    from forgetless.data.kinds import CAUSAL_LM
    from forgetless.strategies import get_strategy_class
    from test_language_models import make_tiny_decoder

    # The example names the 10.5 M decoder that `lm_pretrain` builds (not in a fresh clone): a tiny one stands in.
    folder = make_tiny_decoder(tmp_path / "tiny-gpt2")
    cfg = load_config(str(ROOT / "examples" / "lm_keep_general.yaml"), [f"backbone.name=hf:{folder}"])
    assert cfg.scaling.num_workers == 1 and cfg.eval_tasks
    assert all(CAUSAL_LM in get_strategy_class(s.name).task_kinds for s in cfg.strategies)
    labels = [s.display_name() for s in cfg.strategies]
    assert "replay_prose5" in labels  # the search of pareto_study.py --study lm trains this one


def test_the_lm_search_study_renders_its_own_block():
    ps = load_repo_script("benchmarks/pareto_study.py")
    val = [{"trial_id": "t0", "target/acc": 0.2, "source/forgetting": 0.01},
           {"trial_id": "t1", "target/acc": 0.3, "source/forgetting": 0.03}]
    data = {"grid": {"trials": 2, "wall_seconds": 1.0, "val": val, "test": val, "front": []},
            "searches": [{"seed": 0, "trials": 1, "wall_seconds": 1.0, "val": val[1:], "test": val[1:]}]}
    block = ps.render(data, ps.LM)
    assert block.startswith(ps.LM.start) and block.endswith(ps.LM.end)
    assert ps.LM.start != ps.EARLY_STOP.start and "3 rates x 4 prose shares" in block
    if ps.LM.result.exists():
        assert ps.render(json.loads(ps.LM.result.read_text()), ps.LM) in ps.DOC.read_text(), \
            "docs/tune.md differs from the LM search study's JSON: run pareto_study.py --study lm --docs"

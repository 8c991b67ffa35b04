"""Pareto searches without Ray: the `objectives` config, the front of a search's trials (on validation, reported on
test), its table marks, the edge-of-range warnings, Optuna's multi-objective searchers, and the front rebuilt from a
real (SQLite) MLflow store with its tags and description."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from forgetless.config import ConfigError, load_config
from forgetless.platform import tuning
from forgetless.platform.tuning import summary
from forgetless.search_config import SearchConfig

PARETO_SEARCH = {"objectives": [{"metric": "target/acc", "direction": "max"},
                                {"metric": "source/forgetting", "direction": "min"}]}


def _trial(i: int, sp: int, lr: float, val: tuple[float, float], test: tuple[float, float],
           status: str = "finished") -> tuning.TrialResult:
    metrics = {"val/target/acc": val[0], "val/source/forgetting": val[1],
               "test/target/acc": test[0], "test/source/forgetting": test[1], "test/source/acc": 0.9}
    return tuning.TrialResult(f"t{i}", {"stop_point": sp, "train.lr": lr}, status, 2, val[0], metrics, f"run{i}")


def _search(trials, multi: bool = True, space=None) -> tuning.SearchResult:
    return tuning.SearchResult("s", trials, "max", "pareto max target/acc, min source/forgetting" if multi
                               else "max target/acc", "parent", "uri", ["stop_point", "train.lr"],
                               multi_objective=multi,
                               space=space or {"stop_point": [0, 1, 2], "train.lr": [0.001, 0.003, 0.01]})


# ---------------------------------------------------------------------------------------------------------------------
# the config


def test_objectives_take_standard_names_and_aliases():
    s = SearchConfig(objectives=[{"metric": "acc", "direction": "max"}, {"metric": "forgetting", "direction": "min"}])
    assert s.trade_off() == [("target/acc", "max"), ("source/forgetting", "min")]
    assert s.describe_objective() == "pareto max target/acc, min source/forgetting"
    # the old single objective keeps working, read through the same mapping
    old = SearchConfig(objective={"target/acc": 1.0, "forgetting": -0.5})
    assert old.weights() == {"target/acc": 1.0, "source/forgetting": -0.5} and not old.multi_objective
    assert old.trade_off() == [("target/acc", "max"), ("source/forgetting", "min")]  # the front every search marks


@pytest.mark.parametrize("search, expected", [
    ({"objectives": [{"metric": "target/acc", "direction": "max"}]}, "two or more"),
    ({"objectives": [{"metric": "bwt", "direction": "max"}, {"metric": "acc", "direction": "max"}]},
     "unknown metric 'bwt'"),
    ({"objectives": [{"metric": "acc", "direction": "up"}, {"metric": "forgetting", "direction": "min"}]},
     "direction"),
    ({**PARETO_SEARCH, "mode": "min"}, "objectives replaces objective and mode"),
    ({**PARETO_SEARCH, "scheduler": "asha"}, "not sound for several objectives"),
    ({"objectives": [{"metric": "acc", "direction": "max"}, {"metric": "target/acc", "direction": "min"}]},
     "each metric once"),
])
def test_bad_objectives_are_one_clear_error(tiny_config, search, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(tiny_config(search=search))


def test_searchable_knobs_are_checked_before_the_search(tiny_config):
    def plan(space, strategies=("finetune",)):
        return tuning.validate_search(load_config(tiny_config(strategies=list(strategies), search={
            "space": space, "searcher": "random", "num_samples": 2})))

    # an integer field searched over a float range fails here, with the fix, not in a trial
    with pytest.raises(ConfigError, match=r"search.space.train.epochs: .*add integer: true"):
        plan({"train.epochs": {"low": 1, "high": 4}})
    assert plan({"train.epochs": {"low": 1, "high": 4, "integer": True}}).search.space["train.epochs"].integer
    # strategy knobs by path, their ranges checked against the strategy's own bounds
    assert plan({"strategy.ewc_lambda": {"low": 1.0, "high": 1e4, "log": True}}, ["ewc"])
    assert plan({"strategy.temperature": [1.0, 4.0], "strategy.distill_weight": [0.5, 2.0]}, ["lwf"])
    assert plan({"strategy.alpha": {"low": 1e-3, "high": 1.0, "log": True}}, ["l2_sp"])
    assert plan({"strategy.probe_lr_scale": [1.0, 10.0], "strategy.finetune_lr_scale": [0.1, 1.0]}, ["lp_ft"])
    with pytest.raises(ConfigError, match="strategy.temperature: value 50.0 is not valid"):
        plan({"strategy.temperature": [1.0, 50.0]}, ["lwf"])  # LwF's T is at most 20


def test_a_bad_search_path_exits_2_before_ray(tiny_config, workdir, monkeypatch, capsys):
    import ray
    import yaml

    from forgetless.cli import main

    monkeypatch.setattr(ray, "init", lambda *a, **k: (_ for _ in ()).throw(AssertionError("Ray started")))
    Path("s.yaml").write_text(yaml.safe_dump(tiny_config(search={**PARETO_SEARCH,
                                                                  "space": {"strategy.rank": [4, 8]}})))
    assert main(["tune", "s.yaml"]) == 2
    assert "strategy 'finetune' has no parameter 'rank'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------------
# the front: chosen on validation, reported on test


def test_the_front_is_chosen_on_validation_and_carries_test_numbers():
    trials = [_trial(0, 1, 0.01, (0.80, 0.10), (0.70, 0.10)),
              _trial(1, 1, 0.001, (0.70, 0.02), (0.71, 0.02)),
              # dominated by t1 on validation, though it would be on a test-split front: not on the front
              _trial(2, 2, 0.003, (0.65, 0.05), (0.90, 0.00)),
              _trial(3, 2, 0.001, (0.60, 0.01), (0.59, 0.02)),
              _trial(4, 0, 0.003, (0.95, 0.00), (0.95, 0.00), status="stopped_early")]  # never on the front
    res = _search(trials)
    front = res.pareto()
    assert front.trial_ids == ["t0", "t1", "t3"]  # best target accuracy first
    rec = {r["trial_id"]: r for r in front.records()}
    assert rec["t1"]["test/target/acc"] == 0.71 and rec["t1"]["val/target/acc"] == 0.70
    assert list(front.to_pandas().index) == ["t0", "t1", "t3"]
    assert {r["trial_id"]: r["pareto"] for r in res.records()} == {"t0": True, "t1": True, "t2": False,
                                                                   "t3": True, "t4": False}
    assert res.best.trial_id == "t0"  # a Pareto search's `best`: the front's end on its first objective
    marked = {line.split()[1 if line.startswith("*") else 0]: line.rstrip().endswith(" P")
              for line in res.table().splitlines()[2:7]}
    assert marked == {"t0": True, "t1": True, "t2": False, "t3": True, "t4": False}


def test_a_single_objective_search_marks_the_learning_vs_forgetting_front():
    trials = [_trial(0, 1, 0.003, (0.8, 0.3), (0.8, 0.3)), _trial(1, 1, 0.001, (0.7, 0.1), (0.7, 0.1)),
              _trial(2, 2, 0.001, (0.6, 0.2), (0.6, 0.2))]
    res = _search(trials, multi=False)
    assert res.best.trial_id == "t0" and res.pareto().trial_ids == ["t0", "t1"]
    assert "P = on the Pareto front of max target/acc, min source/forgetting" in res.table()


# ---------------------------------------------------------------------------------------------------------------------
# edges of the searched ranges


@pytest.mark.parametrize("value, dim, edge", [
    (0.01, [0.001, 0.003, 0.01], "top"),
    (0.001, [0.01, 0.001, 0.003], "bottom"),
    (0.003, [0.001, 0.003, 0.01], None),
    (0.099, {"low": 1e-4, "high": 0.1, "log": True}, "top"),  # within the outer 5 % of the log range
    (0.05, {"low": 1e-4, "high": 0.1, "log": True}, None),  # 90 % of the way on the log scale
    (0.05, {"low": 1e-4, "high": 0.1}, None),
    (1.2e-4, {"low": 1e-4, "high": 0.1, "log": True}, "bottom"),
    ("adam", ["sgd", "adam"], None),  # categorical: no edge to widen
    (True, [True, False], None),
    (0.01, [0.01], None),  # a single value was not searched
])
def test_edge_of_a_searched_dimension(value, dim, edge):
    assert tuning.edge_of(value, dim) == edge


def test_edge_warnings_name_the_dimension_and_say_widen():
    trials = [_trial(0, 2, 0.01, (0.8, 0.2), (0.8, 0.2)), _trial(1, 0, 0.003, (0.5, 0.0), (0.5, 0.0))]
    single = _search(trials, multi=False)
    assert single.edge_warnings() == [
        "the best trial: stop_point=2 is at the top of the searched range [0, 2]: widen the range (pre-train "
        "longer, or save later stop points)",
        "the best trial: train.lr=0.01 is at the top of the searched range [0.001, 0.01]: widen the range"]
    assert "! the best trial: train.lr=0.01 is at the top" in single.table()
    # a Pareto search: every front point at an edge; stop point 0 (no pre-training) is no edge to widen
    multi = _search(trials)
    assert multi.pareto().trial_ids == ["t0", "t1"]
    assert [w.split(":")[0] for w in multi.edge_warnings()] == ["front points t0", "front points t0"]
    inside = _search([_trial(0, 1, 0.003, (0.8, 0.2), (0.8, 0.2))], multi=False)
    assert inside.edge_warnings() == [] and "!" not in inside.table()


# ---------------------------------------------------------------------------------------------------------------------
# Optuna's multi-objective searchers (real Optuna, asked outside a run)


@pytest.mark.parametrize("sampler", ["tpe", "nsga2"])
def test_optuna_searches_several_objectives(tiny_config, sampler):
    import pickle

    import optuna

    search = {**PARETO_SEARCH, "searcher": "optuna", "sampler": sampler, "num_samples": 6, "population_size": 2,
              "space": {"stop_point": [1, 2], "train.lr": {"low": 1e-4, "high": 1e-1, "log": True}}}
    plan = tuning.validate_search(load_config(tiny_config(search=search)))
    alg = tuning.search_alg(plan.search, 1)
    assert alg.set_search_properties(None, None, tuning.param_space(plan))
    for i in range(6):
        params = alg.suggest(f"t{i}")
        assert params["stop_point"] in (1, 2) and 1e-4 <= params["train.lr"] <= 1e-1
        lr = params["train.lr"]
        alg.on_trial_complete(f"t{i}", {"val/target/acc": 1 - abs(math.log10(lr) + 2) / 3,
                                        "val/source/forgetting": math.log10(lr) + 4, "objective": 0.0})
    study = alg._ot_study
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert len(study.trials) == 6 and all(len(t.values) == 2 for t in study.trials)
    assert isinstance(study.sampler, {"tpe": optuna.samplers.TPESampler, "nsga2": optuna.samplers.NSGAIISampler}[
        sampler])
    # Tune pickles its searcher with the experiment state (--resume restores it): the restored one goes on suggesting
    restored = pickle.loads(pickle.dumps(alg))
    assert 1e-4 <= restored.suggest("t6")["train.lr"] <= 1e-1


# ---------------------------------------------------------------------------------------------------------------------
# the files, tags and description, rebuilt from a real MLflow store


def _logged_search(uri: str, trials) -> str:
    """A finished Pareto search as `forgetless tune` leaves it in MLflow: a parent run, one child per trial."""
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    exp = c.create_experiment("pareto")
    parent = c.create_run(exp, tags={"forgetless.command": "tune", tuning.SEARCH_TAG: "s"}).info.run_id
    for k, v in {"search.name": "s", "search.objective": "pareto max target/acc, min source/forgetting",
                 "search.pareto_on": "max target/acc, min source/forgetting", "search.space.stop_point": "all",
                 "search.stop_points": [0, 1, 2], "search.space.train.lr": [0.001, 0.003, 0.01]}.items():
        c.log_param(parent, k, str(v))
    for t in trials:
        run = c.create_run(exp, tags={"mlflow.parentRunId": parent, tuning.TRIAL_TAG: t.trial_id,
                                      tuning.STATUS_TAG: t.status}).info.run_id
        for k, v in t.params.items():
            c.log_param(run, f"search.{k}", str(v))
        for k, v in {**t.metrics, "objective": t.objective, "trial_epochs": t.epochs}.items():
            # one trial logged under the old name (`forgetless` before the standard names) still reads
            name = k.replace("source/forgetting", "forgetting") if t.trial_id == "t1" else k
            c.log_metric(run, f"search/{name}", v)
        c.set_terminated(run)
    return parent


def test_report_rebuilds_the_front_tags_and_description_from_mlflow(workdir):
    uri = f"sqlite:///{Path('mlflow.db').resolve()}"
    trials = [_trial(0, 1, 0.01, (0.80, 0.10), (0.70, 0.10)), _trial(1, 1, 0.001, (0.70, 0.02), (0.71, 0.02)),
              _trial(2, 2, 0.003, (0.65, 0.05), (0.90, 0.00))]
    parent = _logged_search(uri, trials)
    res = tuning.load_search(uri, parent)
    assert res.multi_objective and res.trade_off == [("target/acc", "max"), ("source/forgetting", "min")]
    assert res.space == {"stop_point": [0, 1, 2], "train.lr": [0.001, 0.003, 0.01]}
    assert res.pareto().trial_ids == ["t0", "t1"]
    files = tuning.log_search_summary(res, out_dir=Path("first"))
    assert {f.name for f in files} >= {"pareto_front.png", "search_report.html", "search_results.json"}
    assert Path("first/pareto_front.png").stat().st_size > 5000
    page = Path("first/search_report.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and "widen the range" in page
    assert [r["trial_id"] for r in json.loads(Path("first/search_results.json").read_text())["pareto_front"]] == \
        ["t0", "t1"]

    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    tags = {r.data.tags[tuning.TRIAL_TAG]: r.data.tags[tuning.PARETO_TAG]
            for r in c.search_runs([c.get_run(parent).info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")}
    assert tags == {"t0": "true", "t1": "true", "t2": "false"}
    p = c.get_run(parent).data
    assert "train.lr=0.01 is at the top" in p.tags[tuning.EDGE_TAG]
    note = p.tags["mlflow.note.content"]
    assert "**Pareto front** on max target/acc, min source/forgetting: 2 of 3 finished trials" in note
    assert "| t1 | 1 | 0.001 | 70.0 | 71.0 | 2.0 | 2.0 |" in note  # validation and test numbers of a front point
    # a second rebuild (what `forgetless report` or a resumed search does) gives the same front, table and figure data
    again = tuning.load_search(uri, parent)
    assert again.pareto().records() == res.pareto().records() and again.table() == res.table()
    assert summary.description(again) == note


# ---------------------------------------------------------------------------------------------------------------------
# the hypervolume study (benchmarks/pareto_study.py): its analysis and the docs it writes, from its JSON


def _study_module():
    from conftest import load_repo_script

    return load_repo_script("benchmarks/pareto_study.py")


def _run(points: list[tuple[float, float]], **extra) -> dict:
    val = [{"trial_id": f"t{i}", "target/acc": a, "source/forgetting": f} for i, (a, f) in enumerate(points)]
    return {"trials": len(points), "wall_seconds": 1.0, "val": val, "test": val, "front": [], **extra}


def test_the_study_measures_every_front_against_one_reference():
    study = _study_module()
    data = {"grid": _run([(0.6, 0.1), (0.8, 0.3), (0.5, 0.4)]),
            "searches": [_run([(0.7, 0.1), (0.6, 0.2)], seed=0)]}
    a = study.analyse(data)
    assert a["reference"] == {"target/acc": 0.5, "source/forgetting": 0.4}  # the worst of every trial
    # grid front (0.6, 0.1), (0.8, 0.3) against (0.5, 0.4): 0.1 x 0.3 + 0.2 x 0.1 = 0.05
    assert a["grid"]["hv_val"] == pytest.approx(0.05)
    # the search's (0.7, 0.1) beats the grid's (0.6, 0.1): not dominated by the grid; 0.2 x 0.3 = 0.06
    assert a["searches"][0]["hv_val"] == pytest.approx(0.06) and a["searches"][0]["not_dominated_by_grid"] == 1
    assert "| multi-objective TPE, seed 0 | 2 | 1 | 1 | 600.0 | 600.0 | 1 |" in study.render(data)


def test_the_docs_show_the_study_as_its_json_says():
    study = _study_module()
    if not study.RESULT.exists():
        pytest.skip("the study has not been run (python benchmarks/pareto_study.py)")
    block = study.render(json.loads(study.RESULT.read_text()))
    assert block in study.DOC.read_text(), "docs/tune.md differs from the study's JSON: run pareto_study.py --docs"


def test_a_stop_point_without_a_recorded_source_accuracy_still_has_validation_forgetting():
    import numpy as np

    from forgetless.platform.analysis.results import StrategyResult
    from forgetless.platform.tuning.objective import Objective
    from forgetless.platform.tuning.trial_training import _final_metrics

    history = [{"step": 0, "stage": 1, "acc": {"0": 0.22, "1": 0.10}},  # the run's first evaluation: before training
               {"step": 5, "stage": 1, "acc": {"0": 0.18, "1": 0.80}}]
    res = StrategyResult("finetune", "finetune", ["src", "tgt"], np.array([[0.2, 0.1], [0.15, 0.75]]), history,
                         [{"stage": 1, "epochs": 1}], {}, 5, 1.0, 1.0, None, None, "task_incremental",
                         seconds={"training": 0.5, "model_build": 0.25})
    out = _final_metrics(res, Objective({"target/acc": 1.0}, source_before=None))  # θ⁰: none recorded
    assert out["val/source/forgetting"] == pytest.approx(0.22 - 0.18)
    assert out["test/source/forgetting"] == pytest.approx(0.2 - 0.15)  # test: row 0 of R, as before
    assert out["seconds/fixed"] == pytest.approx(0.25) and out["seconds/training"] == pytest.approx(0.5)
    recorded = _final_metrics(res, Objective({"target/acc": 1.0}, source_before=0.3))  # a recorded one wins
    assert recorded["val/source/forgetting"] == pytest.approx(0.3 - 0.18)

"""Ray Tune searches over stop points x learning rates: validation, grid, ASHA, resume after a killed driver.

End-to-end tests run real Ray Tune trials, each a real Ray Train + DeepSpeed (CPU) run, tracked in a real SQLite MLflow
store. They share one pre-training trajectory (a shared storage folder) to keep the suite fast.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import forgetless
from forgetless.config import ConfigError, load_config
from forgetless.platform import tuning
from forgetless.search_config import SearchConfig


def _client():
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{Path('mlflow.db').resolve()}")


def _trial_runs(parent_run_id: str):
    c = _client()
    exp = c.get_run(parent_run_id).info.experiment_id
    runs = c.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    return [r for r in runs if tuning.TRIAL_TAG in r.data.tags]


@pytest.fixture(scope="module")
def shared_storage(tmp_path_factory):
    """One storage folder for the module: the tiny pre-training runs once and every search reuses its trajectory."""
    return str(tmp_path_factory.mktemp("tune_storage"))


# ---------------------------------------------------------------------------------------------------------------------
# bad input: clear errors before anything starts


def _plan(tiny_config, **search):
    cfg = load_config(tiny_config(search=search))
    return tuning.validate_search(cfg)


@pytest.mark.parametrize("space, expected", [
    ({"train.lrr": [0.1]}, "train has no 'lrr'"),
    ({"lr": [0.1]}, "did you mean train.lr"),
    ({"source.classes": [[0, 1]]}, "shared by every trial"),
    ({"strategy.alpha": [0.1]}, "strategy 'finetune' has no parameter 'alpha'"),
    ({"strategy.backbone_lr_scale": [-1.0]}, "search.space.strategy.backbone_lr_scale: value -1.0 is not valid"),
    ({"train": [1]}, "is a whole section"),
    ({"stop_point": [1, 7]}, "no stop point at epoch 7"),
])
def test_bad_search_space_is_rejected_before_ray(tiny_config, space, expected):
    with pytest.raises(ConfigError, match=expected):
        _plan(tiny_config, space=space)


def test_bad_objective_and_searcher_settings_are_rejected(tiny_config):
    with pytest.raises(ConfigError, match="unknown metric 'target/accuracy'"):
        load_config(tiny_config(search={"objective": {"target/accuracy": 1.0}}))
    with pytest.raises(ConfigError, match="grid search needs a list"):
        load_config(tiny_config(search={"space": {"train.lr": {"low": 1e-4, "high": 1e-1, "log": True}}}))
    with pytest.raises(ConfigError, match="grace_period"):
        _plan(tiny_config, scheduler="asha", asha={"grace_period": 2})  # train.epochs is 2: ASHA could never stop
    with pytest.raises(ConfigError, match="no `search:` section"):
        tuning.validate_search(load_config(tiny_config()))


def test_errors_come_before_ray_starts(tiny_config, workdir, monkeypatch):
    # A tripwire, not a stand-in: if validation let this through, the search would go on to start Ray.
    import ray

    def must_not_start(*args, **kwargs):
        raise AssertionError("Ray was started before the search was validated")

    monkeypatch.setattr(ray, "init", must_not_start)
    with pytest.raises(ConfigError, match="unknown metric"):
        forgetless.tune(tiny_config(), search={"objective": "bwt"})
    with pytest.raises(ConfigError, match="no stop point at epoch 3"):
        forgetless.tune(tiny_config(), search={"space": {"stop_point": [3]}})


def test_concurrency_is_capped_by_what_a_trial_needs(tiny_config):
    cfg = load_config(tiny_config(scaling={"num_workers": 2, "cpus_per_worker": 1.5}))
    free = SearchConfig()
    assert tuning.max_concurrent_trials(cfg, free, {"CPU": 7.0}) == 2  # 3 CPUs a trial
    assert tuning.max_concurrent_trials(cfg, SearchConfig(max_concurrent_trials=1), {"CPU": 7.0}) == 1
    with pytest.raises(ConfigError, match="at most 2 fit at once: lower it to 2"):
        tuning.max_concurrent_trials(cfg, SearchConfig(max_concurrent_trials=3), {"CPU": 7.0})
    with pytest.raises(ConfigError, match="one trial needs 2 workers x 1.5 CPU"):
        tuning.max_concurrent_trials(cfg, free, {"CPU": 2.0})
    gpu = load_config(tiny_config(scaling={"num_workers": 2, "use_gpu": True}))
    assert tuning.max_concurrent_trials(gpu, free, {"CPU": 16.0, "GPU": 4.0}) == 2  # GPUs are the limit


def test_objective_combines_metrics():
    obj = tuning.Objective({"target/acc": 1.0, "forgetting": -0.5}, source_before=0.9)
    v = obj.metrics(target_acc=0.8, source_acc=0.7)
    assert v["source/forgetting"] == pytest.approx(0.2)
    assert v["source/retention"] == pytest.approx(0.7 / 0.9)
    assert v["objective"] == pytest.approx(0.8 - 0.5 * 0.2)
    assert SearchConfig(objective={"target/acc": 1.0, "forgetting": -0.5}).describe_objective() == \
        "max target/acc - 0.5*source/forgetting"


def test_stop_points_follow_the_pretraining_schedule(tiny_config):
    cfg = load_config(tiny_config(pretrain={"epochs": 12, "checkpoint_every": 5}))
    assert tuning.planned_stop_points(cfg) == [0, 5, 10, 12]
    assert tuning.validate_search(cfg, SearchConfig()).stop_points == [0, 5, 10, 12]  # default: all of them


# ---------------------------------------------------------------------------------------------------------------------
# end to end on embedded Ray


@pytest.mark.e2e
@pytest.mark.slow  # CI's 15-minute budget: 179 s in the fresh-clone CI run of 559ac4c (passed there)
def test_grid_search_logs_every_trial_and_picks_the_best(ray_session, workdir, tiny_config, shared_storage, capsys):
    # one worker per trial: the 2-CPU cluster runs two trials at a time (concurrency = CPUs / CPUs per trial)
    cfg = tiny_config(storage=shared_storage, scaling={"num_workers": 1},
                      search={"space": {"stop_point": [1, 2], "train.lr": [0.01, 0.0001]}})
    cleaners = _actors_of_class("PlacementGroupCleaner")
    controllers, runners = _actors_of_class("TrainController"), _actors_of_class("TrialRunner")
    res = forgetless.tune(cfg)
    console = capsys.readouterr()
    # each of the two trial slots has a trial runner and a Train controller host of this driver's (kept for its next
    # search): the 4 trials' fits start no controller process of their own, and at most 2 runners were started
    assert _actors_of_class("TrainController") == controllers
    assert len(_actors_of_class("TrialRunner") - runners) <= 2
    # Tune's experiment box and results-folder lines stay off stdout; on this embedded cluster (no dashboard) the
    # trials' fits start no PlacementGroupCleaner, which could not ask Ray's state API about their controllers
    assert "Configuration for experiment" not in console.out and "View detailed results" not in console.out
    assert "State API" not in console.err
    assert _actors_of_class("PlacementGroupCleaner") == cleaners

    assert len(res.trials) == 4 and all(t.status == "finished" for t in res.trials)
    assert {(t.stop_point, t.params["train.lr"]) for t in res.trials} == {(1, 0.01), (1, 0.0001), (2, 0.01),
                                                                          (2, 0.0001)}
    runs = _trial_runs(res.parent_run_id)
    assert sorted(r.data.tags[tuning.TRIAL_TAG] for r in runs) == sorted(t.trial_id for t in res.trials)
    assert all(r.info.status == "FINISHED" for r in runs)
    # the best configuration is the one with the best objective among the logged results
    logged = {r.data.tags[tuning.TRIAL_TAG]: r.data.metrics["search/objective"] for r in runs}
    assert logged[res.best.trial_id] == max(logged.values())  # trials may tie on this tiny validation set
    assert res.best_config == {"stop_point": res.best.stop_point, "train.lr": res.best.params["train.lr"]}
    # the per-trial table as records and as a DataFrame, not only as text
    records = {r["trial_id"]: r for r in res.records()}
    assert records[res.best.trial_id]["objective"] == res.best.objective
    assert {(r["stop_point"], r["train.lr"]) for r in records.values()} == {(1, 0.01), (1, 0.0001), (2, 0.01),
                                                                           (2, 0.0001)}
    assert list(res.to_pandas().sort_values("objective").index)[-1] in {t.trial_id for t in res.trials}
    # the objective (target/acc) is the validation accuracy the workers logged at its last epoch (val/target/acc)
    c = _client()
    for r in runs:
        history = sorted(c.get_metric_history(r.info.run_id, "val/target/acc"), key=lambda m: m.step)
        assert len(history) == 1 + cfg["train"]["epochs"]
        assert r.data.metrics["search/objective"] == pytest.approx(history[-1].value)
        assert r.data.params["search.stop_point"] in ("1", "2")
    parent = c.get_run(res.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["search.objective"] == "max target/acc"
    assert parent.data.params["search.space.train.lr"] == "[0.01, 0.0001]"
    arts = {a.path for a in c.list_artifacts(res.parent_run_id)}
    assert {"search.json", "search_results.txt", "search_results.json", "target_vs_stop_point.png",
            "stop_point_lr_heatmap.png"} <= arts
    # `forgetless report` rebuilds the same table and the figures from MLflow alone
    from forgetless.cli import main

    assert main(["report", res.parent_run_id, "--out", "rebuilt"]) == 0
    logged_table = Path(c.download_artifacts(res.parent_run_id, "search_results.txt")).read_text()
    assert Path("rebuilt/search_results.txt").read_text() == logged_table
    assert Path("rebuilt/stop_point_lr_heatmap.png").stat().st_size > 1000
    # running the same search again is refused (it would redo finished work); --resume reloads it
    with pytest.raises(ConfigError, match="already ran"):
        forgetless.tune(cfg)


def _actors_of_class(name: str) -> set[str]:
    """Every actor of this class the cluster has had, alive or dead (the GCS's table)."""
    from ray._private import state as gcs_state

    return {a["ActorID"] for a in gcs_state.actors().values() if a["ActorClassName"] == name}


@pytest.mark.e2e
@pytest.mark.slow  # minutes on 2 cores: outside CI's budget, run by `make test-all`
def test_asha_stops_a_poor_trial_early(ray_session, workdir, tiny_config, shared_storage):
    # Trials run one at a time in grid order (stop point varies fastest): the lr=0.05 trials reach ASHA's rungs
    # first, so each lr=1e-6 trial (hardly moves from the untrained head) is below the cutoff at epoch 1.
    cfg = tiny_config(storage=shared_storage, train={"epochs": 4, "lr": 0.05, "batch_size": 64},
                      search={"space": {"stop_point": [1, 2], "train.lr": [0.05, 1e-6]}, "scheduler": "asha",
                              "asha": {"grace_period": 1, "reduction_factor": 2}, "max_concurrent_trials": 1})
    res = forgetless.tune(cfg)

    stopped = [t for t in res.trials if t.status == "stopped_early"]
    finished = [t for t in res.trials if t.status == "finished"]
    assert stopped, [(t.params, t.status, t.epochs) for t in res.trials]
    assert all(t.epochs < 4 for t in stopped) and all(t.epochs == 4 for t in finished)
    # ASHA may also stop a good-lr trial (stop point 2 can start slower than stop point 1); the lr=1e-6 ones always
    # fall below the median of the rung-1 values recorded before them
    assert all(t.status == "stopped_early" for t in res.trials if t.params["train.lr"] == 1e-6)
    assert res.trial_epochs < 4 * len(res.trials)
    assert res.best.params["train.lr"] == 0.05
    c = _client()
    for r in _trial_runs(res.parent_run_id):
        n_points = len(c.get_metric_history(r.info.run_id, "val/target/acc"))
        if r.data.tags[tuning.STATUS_TAG] == "stopped_early":
            assert r.info.status == "KILLED" and n_points < 1 + 4
        else:
            assert r.info.status == "FINISHED" and n_points == 1 + 4


@pytest.mark.e2e
@pytest.mark.slow  # minutes on 2 cores: outside CI's budget, run by `make test-all`
def test_killed_search_resumes_and_runs_every_trial_once(ray_session, workdir, tiny_config, shared_storage):
    # One worker per trial, so two trials run at once on the 2-CPU cluster (and write to SQLite together).
    cfg = tiny_config(storage=shared_storage, scaling={"num_workers": 1}, train={"epochs": 3, "lr": 0.01,
                                                                                "batch_size": 64},
                      search={"space": {"stop_point": [1, 2], "train.lr": [0.01, 0.001]}})
    Path("search.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    with open("driver.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "forgetless.cli", "tune", "search.yaml"], stdout=log,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            if ") finished: objective" in Path("driver.log").read_text():
                break
            time.sleep(0.5)
        assert proc.poll() is None, "the search ended before it could be killed:\n" + Path("driver.log").read_text()
        os.kill(proc.pid, signal.SIGKILL)  # the driver dies; its embedded Ray cluster goes down with it
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
    c = _client()
    parents = c.search_runs([c.get_experiment_by_name("forgetless").experiment_id],
                            "tags.`forgetless.command` = 'tune'")
    assert len(parents) == 1
    done_before = {r.data.tags[tuning.TRIAL_TAG]: r for r in _trial_runs(parents[0].info.run_id)
                   if r.info.status == "FINISHED"}
    assert 1 <= len(done_before) < 4

    res = forgetless.tune("search.yaml", resume=True)

    assert res.parent_run_id == parents[0].info.run_id  # the same search, not a new one
    assert len(res.trials) == 4 and all(t.status == "finished" for t in res.trials)
    assert len({(t.stop_point, t.params["train.lr"]) for t in res.trials}) == 4
    runs = _trial_runs(res.parent_run_id)
    ids = [r.data.tags[tuning.TRIAL_TAG] for r in runs]
    assert sorted(ids) == sorted(t.trial_id for t in res.trials)  # one MLflow run per trial, none duplicated
    for r in runs:
        steps = [m.step for m in c.get_metric_history(r.info.run_id, "val/target/acc")]
        assert len(set(steps)) == 1 + 3, (r.data.tags[tuning.TRIAL_TAG], steps)  # every epoch trained once
        tid = r.data.tags[tuning.TRIAL_TAG]
        if tid in done_before:  # finished before the kill: not trained again
            assert r.info.run_id == done_before[tid].info.run_id
            assert len(steps) == 1 + 3
    # each trial has exactly one Ray Train run
    for t in res.trials:
        assert len([d for d in Path(shared_storage).iterdir() if f"-{t.trial_id}-" in d.name]) == 1


def test_optuna_and_random_searchers_sample_the_declared_space(tiny_config):
    # Real Optuna (TPE) and Tune's random sampler, asked for configurations outside a run.
    space = {"stop_point": [1, 2], "train.lr": {"low": 1e-4, "high": 1e-1, "log": True},
             "strategy.backbone_lr_scale": [0.1, 1.0]}
    plan = _plan(tiny_config, space=space, searcher="optuna", num_samples=4)
    alg = tuning._search_alg(plan.search, 1)
    assert alg.set_search_properties(tuning.OBJECTIVE, "max", tuning.param_space(plan))
    for i in range(4):
        params = alg.suggest(f"t{i}")
        assert params["stop_point"] in (1, 2) and params["strategy.backbone_lr_scale"] in (0.1, 1.0)
        assert 1e-4 <= params["train.lr"] <= 1e-1
        cfg = tuning.trial_config(plan.cfg, params, f"t{i}")  # every suggestion is a valid experiment config
        assert cfg.train.lr == params["train.lr"] and cfg.strategies[0].params["backbone_lr_scale"] in (0.1, 1.0)
    plan = _plan(tiny_config, space=space, searcher="random", num_samples=3)
    assert tuning._search_alg(plan.search, 2).max_concurrent == 2


# slow tier (make test-all): CI's 15-minute budget (docs/performance.md); run and reported in the stop's closing note
@pytest.mark.slow
@pytest.mark.e2e
def test_pareto_search_prints_plots_and_logs_its_front(ray_session, workdir, tiny_config, shared_storage, capsys):
    # Optuna's NSGA-II over two objectives, three one-worker trials (two at a time on the 2-CPU cluster)
    search = {"objectives": [{"metric": "target/acc", "direction": "max"},
                             {"metric": "source/forgetting", "direction": "min"}],
              "searcher": "optuna", "sampler": "nsga2", "population_size": 2, "num_samples": 3,
              "space": {"stop_point": [1, 2], "train.lr": {"low": 1e-3, "high": 1e-1, "log": True}}}
    cfg = tiny_config(storage=shared_storage, scaling={"num_workers": 1}, search=search)
    res = forgetless.tune(cfg)

    assert res.multi_objective and len(res.trials) == 3 and all(t.status == "finished" for t in res.trials)
    front = res.pareto()
    assert 1 <= len(front) <= 3
    # the front is the non-dominated trials on their validation numbers; each point carries its test numbers
    for t in res.trials:
        beaten = any(o.metrics["val/target/acc"] >= t.metrics["val/target/acc"]
                     and o.metrics["val/source/forgetting"] <= t.metrics["val/source/forgetting"]
                     and (o.metrics["val/target/acc"], o.metrics["val/source/forgetting"])
                     != (t.metrics["val/target/acc"], t.metrics["val/source/forgetting"]) for o in res.trials)
        assert (t.trial_id in front.trial_ids) == (not beaten)
    assert all(0.0 <= r["test/target/acc"] <= 1.0 for r in front.records())
    c = _client()
    runs = _trial_runs(res.parent_run_id)
    assert {r.data.tags[tuning.TRIAL_TAG] for r in runs if r.data.tags[tuning.PARETO_TAG] == "true"} == \
        set(front.trial_ids)
    parent = c.get_run(res.parent_run_id).data
    assert "**Pareto front** on max target/acc, min source/forgetting" in parent.tags["mlflow.note.content"]
    assert tuning.EDGE_TAG in parent.tags
    assert {"pareto_front.png", "search_report.html"} <= {a.path for a in c.list_artifacts(res.parent_run_id)}

    from forgetless.cli import main

    capsys.readouterr()
    assert main(["report", res.parent_run_id, "--out", "rebuilt"]) == 0
    printed = capsys.readouterr().out
    assert "Pareto front (" in printed and all(f"  {i}: " in printed for i in front.trial_ids)
    logged_table = Path(c.download_artifacts(res.parent_run_id, "search_results.txt")).read_text()
    assert Path("rebuilt/search_results.txt").read_text() == logged_table
    # --resume of a finished search trains nothing again and rebuilds the same front
    again = forgetless.tune(cfg, resume=True)
    assert again.parent_run_id == res.parent_run_id
    assert again.pareto().records() == front.records()

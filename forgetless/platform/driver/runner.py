"""The driver: validate, start (or join) Ray, pre-train once, run each strategy as a Ray Train job, track in MLflow.

Run identity follows Ray Train V2: `RunConfig(storage_path, name)` with a deterministic name (experiment name, strategy
label and a hash of everything that shapes the run), so re-running the same config resumes from the latest checkpoint.
"""
from __future__ import annotations

import functools
import json
import math
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import ray

from forgetless.config import ExperimentConfig
from forgetless.console import say
from forgetless.hashing import short_hash
from forgetless.platform.analysis.paired import paired_metrics
from forgetless.platform.analysis.results import (
    CompareResult,
    StrategyResult,
    mean_sd,
    summary_metrics,
)
from forgetless.platform.driver import parallel_runs as fanout
from forgetless.platform.driver.fits import pretrain, transfer
from forgetless.platform.driver.preflight import preflight
from forgetless.platform.driver.ray_cluster import (
    check_embedded_resources,
    check_resources,
    ensure_ray,
    init_ray,
)
from forgetless.platform.driver.run_outputs import RunOutputs
from forgetless.platform.tracking import html_report as report_html
from forgetless.platform.tracking import invocations
from forgetless.platform.tracking import mlflow_runs as tracking
from forgetless.platform.tracking import plots
from forgetless.platform.tracking import run_descriptions as review
from forgetless.platform.worker import op_builds as build_locks


def execute(cfg: ExperimentConfig, command: str, on_result: Callable[[StrategyResult], None] | None = None,
            seeds: list[int] | None = None) -> CompareResult:
    """Run every strategy of `cfg` on its stream, per seed (`seeds`, else the config's `seeds`/`seed`) from that seed's
    pre-trained checkpoint; independent runs side by side where the cluster has room (fanout); one MLflow parent run."""
    if seeds:
        cfg = cfg.model_copy(update={"seeds": list(seeds)})
    seed_list = cfg.seed_list()
    uri = preflight(cfg)
    _start_ray(cfg, uri)
    target = _open_parent(cfg, command, uri)
    try:
        out = _run_seeds(cfg, seed_list, target, on_result)
        _log_parent_summary(out, uri)
        tracking.flush_buffered(uri)  # metric points an MLflow outage kept on disk
        invocations.end_invocation(uri, target.parent_run_id, "FINISHED",
                                   [(r.run_label(len(seed_list) > 1), r.mlflow_run_id) for r in out.results])
        return out
    except BaseException as e:
        invocations.end_invocation(uri, target.parent_run_id, tracking.end_status(e))
        raise


def _start_ray(cfg: ExperimentConfig, uri: str) -> None:
    """Connect to the configured cluster, or start the embedded one; then check the run fits in it."""
    if not ray.is_initialized() and not (cfg.ray_address or os.environ.get("RAY_ADDRESS")):
        # an embedded run's workers build DeepSpeed's ops on this machine: a stale build lock is named now, not
        # after Ray started (the workers wait on it too, bounded, wherever they run)
        build_locks.use_private_extensions_dir()
        build_locks.wait_for_build_locks()
        check_embedded_resources(cfg)  # a run the machine cannot place: refused before anything starts or is written
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="forgetless-open-store") as pool:
            store_opened = pool.submit(tracking.open_store, uri)  # beside the cluster's start: neither needs the other
            init_ray(None, cfg.scaling.use_gpu)
            store_opened.result()  # (a store that cannot be opened fails here as it would in _open_parent)
    else:
        ensure_ray(cfg)
    check_resources(cfg)


def _open_parent(cfg: ExperimentConfig, command: str, uri: str) -> tracking.TrackingTarget:
    exp_id = tracking.ensure_experiment(uri, cfg.tracking.experiment)
    review.set_model_training_view(uri, exp_id)  # MLflow opens it in the model-training view, not the GenAI one
    # the same command and config continues its parent run: one parent per experiment, however often it was resumed
    parent = invocations.open_parent(uri, exp_id, f"{cfg.name} ({command})", {
        "forgetless.command": command, "forgetless.name": cfg.name,
        "forgetless.config_hash": short_hash(cfg.model_dump(mode="json")),
        "forgetless.strategies": ",".join(s.display_name() for s in cfg.strategies),
        "forgetless.evaluation": cfg.evaluation, "forgetless.seeds": ",".join(map(str, cfg.seed_list())),
    })
    tracking.log_params(uri, parent, tracking.flatten("", cfg.model_dump(mode="json")))
    say(f"MLflow: {uri}, experiment {cfg.tracking.experiment!r}, parent run {parent}")
    return tracking.TrackingTarget(uri, exp_id, parent)


def _run_seeds(cfg: ExperimentConfig, seed_list: list[int], target: tracking.TrackingTarget,
               on_result: Callable[[StrategyResult], None] | None) -> CompareResult:
    """Pre-train per seed, then every strategy per seed; metrics relative to the best strategy of the same seed."""
    uri = target.tracking_uri
    per_seed = [cfg.for_seed(s) for s in seed_list]
    several = len(seed_list) > 1
    trajectories = fanout.run_all([functools.partial(pretrain, c, target, run_label=f"pretrain (seed {c.seed})"
                                                     if several else None) for c in per_seed],
                                  fanout.concurrency(cfg, len(per_seed)))
    c = tracking.client(uri)
    c.set_tag(target.parent_run_id, "forgetless.pretrain_run", trajectories[0].run_name)
    c.set_tag(target.parent_run_id, "forgetless.pretrain_reused", str(trajectories[0].reused).lower())
    calls = [functools.partial(transfer, sc, s, traj.final().uri, target, trajectory=traj,
                               run_label=f"{s.display_name()} (seed {sc.seed})" if several else None)
             for sc, traj in zip(per_seed, trajectories) for s in cfg.strategies]
    outputs = RunOutputs(cfg, uri)

    def returned(res: StrategyResult) -> None:
        outputs.run_returned(res)
        if on_result:
            on_result(res)

    try:
        results = fanout.run_all(calls, fanout.concurrency(cfg, len(calls)), returned)
        for seed in seed_list:
            group = [r for r in results if r.seed == seed]
            # learning-speed thresholds are relative to the best target accuracy *any* strategy reached (same seed)
            T = len(group[0].task_names) - 1
            best = {st: max(r.best_target_acc(st) for r in group) for st in range(1, T + 1)}
            for r in group:
                r.compute_metrics(best)
                outputs.finish(r)
    finally:
        outputs.close()
    return CompareResult(cfg.name, results, trajectories[0], target.parent_run_id, uri, target.experiment_id,
                         seeds=seed_list, reference=cfg.reference_label())


SEED_TABLES_FILE = "seeds.json"


def seed_aggregate_metrics(out: CompareResult) -> dict[str, float]:
    """The parent run's aggregates over seeds: `<label>/<summary metric>/mean` and `/sd` (MLflow names and scales, as
    each child run's summary metrics) and `<label>/n`; and each strategy's paired differences from the reference
    (`<label>/vs_<reference>/<metric>/...`, analysis/paired.py)."""
    metrics: dict[str, float] = {}
    for label in out.labels():
        runs = [summary_metrics(r.metrics) for r in out.runs(label)]
        metrics[f"{label}/n"] = float(len(runs))
        for name in runs[0]:
            mean, sd = mean_sd([m.get(name, math.nan) for m in runs])
            metrics[f"{label}/{name}/mean"] = mean
            if not math.isnan(sd):
                metrics[f"{label}/{name}/sd"] = sd
    metrics.update(paired_metrics(out.paired()))
    return {k: v for k, v in metrics.items() if not math.isnan(v)}


def _write_seed_tables(out: CompareResult, folder: Path) -> str:
    """seeds.json: every seed's record and the per-strategy mean/sd/n (what the table shows, and more), and each
    strategy's paired differences from the reference strategy (fractions; analysis/paired.py)."""
    Path(folder, SEED_TABLES_FILE).write_text(json.dumps(
        {"seeds": out.seeds, "per_seed": out.records(), "summary": out.summary_records(),
         "reference": out.reference_label(), "paired": [d.to_dict() for d in out.paired()], "table": out.table()},
        indent=1, default=float))
    return SEED_TABLES_FILE


def _log_parent_summary(out: CompareResult, uri: str) -> None:
    """The parent run's description (findings, table, links), the comparison files and the HTML report; the pre-training
    run's context; the experiment's description and model-training view."""
    c = tracking.client(uri)
    with tempfile.TemporaryDirectory() as d:
        Path(d, "comparison.txt").write_text(out.table() + "\n")
        several = len(out.seeds) > 1
        Path(d, "comparison.json").write_text(json.dumps(
            [{"label": r.run_label(several), "strategy": r.strategy, "seed": r.seed, "metrics": r.metrics,
              "R": r.accuracy_matrix.tolist(), "task_names": r.task_names, "mlflow_run_id": r.mlflow_run_id}
             for r in out.results], indent=1))
        plots.comparison_curves({r.run_label(several): r.history for r in out.results},
                                Path(d, "comparison_curves.png"), f"{out.name}: strategies compared",
                                phases={r.run_label(several): r.phase_log for r in out.results})
        report_html.write_report(report_html.ComparisonView.of(out), Path(d, report_html.REPORT_FILE))
        files = ["comparison.txt", "comparison.json", "comparison_curves.png", report_html.REPORT_FILE]
        if several:
            files.append(_write_seed_tables(out, Path(d)))
        for f in files:
            c.log_artifact(out.parent_run_id, str(Path(d, f)))
    if several:
        tracking.log_metrics(uri, out.parent_run_id, seed_aggregate_metrics(out), step=0)
    context = review.context_tags()
    review.set_tags(uri, out.parent_run_id, context)
    if out.trajectory is not None and out.trajectory.mlflow_run_id and not out.trajectory.reused:
        review.set_tags(uri, out.trajectory.mlflow_run_id, context)
        review.set_description(uri, out.trajectory.mlflow_run_id, "Source pre-training: its stop points are the "
                               "strategies' starting weights (curves under `pretrain/...`).")
    review.set_description(uri, out.parent_run_id, review.parent_description(out))
    review.set_model_training_view(uri, out.experiment_id, review.experiment_description(
        out.name, out.experiment_id, out.parent_run_id))

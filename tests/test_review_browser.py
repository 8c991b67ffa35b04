"""Reviewing a comparison as a user does: a real `mlflow server` on a temporary store, a small `forgetless compare`
logging to it, and MLflow's UI driven by headless Chromium (Debian's `chromium` with Playwright). Screenshots go to
test-artifacts/browser/ (git-ignored) for a person to look at.

Skipped, with the reason, only where no Chromium is installed (`make test` installs it with apt-get where it can).
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from conftest import MLFLOW_SERVER_ENV, TINY

from forgetless import cli
from forgetless.platform.tracking import model_export
from forgetless.platform.tracking import html_report as report_html
from forgetless.platform.tracking import run_descriptions as review
from forgetless.platform.tracking import mlflow_runs as tracking
from forgetless.platform.driver.ports import free_port

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]
SCREENSHOTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "browser"
STRATEGIES = ["finetune", "linear_probe", {"name": "lp_ft", "params": {"probe_epochs": 1}}]
LABELS = ["finetune", "linear_probe", "lp_ft"]
UI_TIMEOUT_MS = 60_000  # the first page load compiles MLflow's JS bundle on a busy 2-core machine

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (apt-get install -y chromium); "
                                                          "the MLflow UI cannot be driven without a browser")]


def _wait_healthy(url: str, server: subprocess.Popen, limit_s: float = 120.0) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {server.returncode}")
        try:
            urllib.request.urlopen(url + "/health", timeout=2).read()
            return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"mlflow server at {url} did not answer within {limit_s:.0f} s")


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on a temporary SQLite store and artifact folder, stopped (its process group) after the module."""
    store = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{store}/mlflow.db",
         "--artifacts-destination", str(store / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=open(store / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, **MLFLOW_SERVER_ENV})
    try:
        _wait_healthy(url, server)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def compared(mlflow_server, ray_session, tmp_path_factory):
    """`forgetless compare` of three strategies (models logged) against the server; its printed lines and ids."""
    work = tmp_path_factory.mktemp("compare")
    # 1 worker per run: on the 2 CPUs of the test cluster two strategy runs go side by side (the UI is what is tested)
    cfg = {**TINY, "strategies": STRATEGIES, "storage": str(work / "runs"), "scaling": {"num_workers": 1},
           "tracking": {"log_model": True, "tracking_uri": mlflow_server, "experiment": "review"}}
    path = work / "tiny.json"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        assert cli.main(["compare", str(path)]) == 0
    text = printed.getvalue()
    link = re.search(r"review it: (http\S+)", text).group(1)
    parent_id = re.search(r"MLflow parent run ([0-9a-f]{32})", text).group(1)
    c = tracking.client(mlflow_server)
    parent = c.get_run(parent_id)
    children = c.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'")
    runs = {ch.info.run_name: ch for ch in children}
    return {"uri": mlflow_server, "link": link, "parent": parent, "runs": runs, "work": work, "printed": text,
            "experiment_id": parent.info.experiment_id}


@pytest.fixture(scope="module")
def browser():
    # deferred: playwright is a test-only package, needed once Chromium is known to exist
    from playwright.sync_api import sync_playwright

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    pw = sync_playwright().start()
    chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
    try:
        yield chromium
    finally:
        chromium.close()
        pw.stop()


@pytest.fixture
def page(browser):
    """A fresh page that records console errors and uncaught exceptions."""
    context = browser.new_context(viewport={"width": 1600, "height": 1000})
    p = context.new_page()
    p.set_default_timeout(UI_TIMEOUT_MS)
    p.errors = []
    p.on("console", lambda msg: p.errors.append(msg.text) if msg.type == "error" else None)
    p.on("pageerror", lambda exc: p.errors.append(str(exc)))
    yield p
    context.close()


def test_tracked_run_holds_what_a_reviewer_needs(compared):
    """Not the browser: what the UI will show, checked through the API (names, units, times, context, inputs)."""
    c = tracking.client(compared["uri"])
    assert set(LABELS) <= set(compared["runs"]) and "pretrain" in compared["runs"]
    parent = compared["parent"]
    assert "forgot most" in parent.data.tags[review.NOTE_TAG] and "learned fastest" in parent.data.tags[review.NOTE_TAG]
    assert c.get_experiment(compared["experiment_id"]).tags[review.EXPERIMENT_KIND_TAG] == review.MODEL_TRAINING_KIND
    for label in LABELS:
        run = c.get_run(compared["runs"][label].info.run_id)
        m = run.data.metrics
        assert "stage" not in m and not any(k.startswith("R/") for k in m)
        forgetting = c.get_metric_history(run.info.run_id, "forgetting/max_pp")
        assert {h.step for h in forgetting} == {0} and 0.0 <= forgetting[-1].value <= 100.0
        target = sorted(c.get_metric_history(run.info.run_id, "val/target/acc"), key=lambda h: h.step)
        fresh_head = sorted(c.get_metric_history(run.info.run_id, "val/task/digits_5-6-7-8-9/acc"),
                            key=lambda h: h.step)[0].value
        assert target[0].step == 0 and target[0].value == pytest.approx(fresh_head)  # not the source's accuracy
        assert any(k.startswith("test/task/") for k in m) and any(k.startswith("system/") for k in m)
        assert run.data.tags[review.NOTE_TAG].startswith(f"**{label}**")
        assert run.data.tags.get("mlflow.user") and run.data.tags.get("mlflow.source.name")
        assert len(run.inputs.dataset_inputs) == 6  # 2 tasks x train/val/test
    # Each run ends when its training ended, not all together once the last strategy's artifacts were logged: the
    # 1-worker runs go two at a time on the 2 CPUs, so the third starts only after one of the first two has ended.
    infos = [c.get_run(compared["runs"][label].info.run_id).info for label in LABELS]
    assert min(i.end_time for i in infos[:2]) <= infos[2].start_time
    assert all(i.start_time < i.end_time for i in infos)


def _screenshot(page, name: str) -> None:
    page.screenshot(path=str(SCREENSHOTS / name), full_page=True)


def test_printed_link_opens_parent_run_with_its_description(compared, page):
    page.goto(compared["link"])
    page.get_by_text("forgot most").first.wait_for()
    page.get_by_text("learned fastest").first.wait_for()
    _screenshot(page, "01_printed_link_parent_run.png")
    body = page.inner_text("body")
    assert "tiny (compare)" in body
    for label in LABELS:  # the table's links to the child runs
        assert page.get_by_role("link", name=label).count() >= 1
    assert "Detect Issues" not in body  # not the GenAI overview


def test_chart_view_draws_one_forgetting_bar_per_strategy(compared, page):
    exp = compared["experiment_id"]
    # the strategy runs only: a filter lists child runs flat, without expanding their parent
    flt = urllib.parse.quote("tags.`forgetless.mode` = 'transfer'")
    page.goto(f"{compared['uri']}/#/experiments/{exp}/runs?workflowType=machine_learning&compareRunsMode=CHART"
              f"&searchFilter={flt}")
    # MLflow lists matching child runs collapsed under their parent and charts only the rows shown: expand it.
    page.locator("button[data-component-id*='runnamecellrenderer']").first.click()
    search = page.get_by_placeholder("Search metric charts").first
    search.fill("forgetting/max_pp")
    card = page.locator("[data-testid='experiment-view-compare-runs-card']").filter(has_text="forgetting/max_pp").first
    card.locator(".barlayer .point").first.wait_for()
    page.wait_for_timeout(1000)  # plotly finishes drawing the other bars
    _screenshot(page, "02_chart_view_forgetting_bars.png")
    assert card.locator(".barlayer .point").count() == len(LABELS)


def test_logged_model_page_shows_its_final_metrics(compared, page):
    c = tracking.client(compared["uri"])
    run = c.get_run(compared["runs"]["lp_ft"].info.run_id)
    model_id = run.outputs.model_outputs[-1].model_id
    model = c.get_logged_model(model_id)
    assert model.name == "lp_ft"
    linked = {m.key: m for m in model.metrics}
    final_step = int(run.data.metrics["optimizer_steps"])
    assert linked["val/target/acc"].step == final_step and "forgetting/max_pp" in linked
    page.goto(f"{compared['uri']}/#/experiments/{compared['experiment_id']}/models/{model_id}")
    page.get_by_text("val/target/acc").first.wait_for()
    _screenshot(page, "03_logged_model_lp_ft.png")
    body = page.inner_text("body")
    assert "lp_ft" in body and "forgetting/max_pp" in body
    assert "source forgetting" in body  # its Description (mlflow.note.content) says what it is and how it did
    final = run.data.metrics["val/target/acc"]  # the model's step is the last evaluation: its value, not step 0's
    assert any(text in body for text in (str(final), str(round(final, 4)), str(round(final, 3)), f"{final:.2f}"))


def test_html_report_renders_offline(compared, page):
    c = tracking.client(compared["uri"])
    d = compared["work"] / "report"
    d.mkdir(exist_ok=True)
    path = Path(c.download_artifacts(compared["parent"].info.run_id, report_html.REPORT_FILE, str(d)))
    text = path.read_text()
    # No CDN: no script or stylesheet is loaded from anywhere (plotly's JS is inlined; its code merely mentions URLs).
    assert not re.search(r"<script[^>]*\bsrc=", text) and not re.search(r"<link[^>]*\bhref=\"https?:", text)
    remote = []
    page.on("request", lambda r: remote.append(r.url) if not r.url.startswith(("file:", "data:", "blob:")) else None)
    page.goto(path.as_uri())
    page.locator(".js-plotly-plot").nth(3).wait_for()
    _screenshot(page, "04_html_report.png")
    assert page.locator(".js-plotly-plot").count() == 4
    assert page.errors == [] and remote == []
    body = page.inner_text("body")
    assert "forgot most" in body and "learned fastest" in body
    comparison = json.loads(Path(c.download_artifacts(compared["parent"].info.run_id, "comparison.json",
                                                      str(d))).read_text())
    for row in comparison:
        assert f"{100 * row['metrics']['source/forgetting']:.1f}" in body
        assert f"{100 * row['metrics']['acc']:.1f}" in body


def test_report_html_command_and_register(compared, tmp_path):
    parent_id = compared["parent"].info.run_id
    out = tmp_path / "report"
    assert cli.main(["report", parent_id, "--html", "--tracking-uri", compared["uri"], "--out", str(out)]) == 0
    assert "learned fastest" in (out / report_html.REPORT_FILE).read_text()
    assert cli.main(["register", parent_id, "--strategy", "lp_ft", "--tracking-uri", compared["uri"]]) == 0
    c = tracking.client(compared["uri"])
    version = c.get_model_version_by_alias("lp_ft", "champion")
    run = compared["runs"]["lp_ft"]
    assert float(version.tags["forgetting/max_pp"]) == pytest.approx(run.data.metrics["forgetting/max_pp"])
    assert version.tags[model_export.MODEL_ID_TAG] == run.outputs.model_outputs[-1].model_id
    # deferred: mlflow.pytorch is a heavy import only this check needs
    import mlflow.pytorch
    import torch

    mlflow.set_tracking_uri(compared["uri"])
    loaded = mlflow.pytorch.load_model("models:/lp_ft@champion")
    logits = loaded(torch.zeros(3, 1, 8, 8))
    assert tuple(logits.shape) == (3, 10) and not math.isnan(float(logits.sum()))

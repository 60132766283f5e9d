"""End to end through the MLflow UI: a real `main` study, a real `mlflow server`, headless Chromium.

What a person would do after a study: open the experiment, expand the study run, find the six
configurations, filter them, compare them side by side and look at a learning curve. Screenshots of
each step land in test-output/ui/ (gitignored) so a failure can be looked at.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import PROJECT, run_cli
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from study.config import LOSSES, config_names
from tracking import keys

pytestmark = pytest.mark.slow
log = logging.getLogger(__name__)

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = PROJECT / "test-output" / "ui"
CHILD_NAMES = config_names()  # tanh-crossentropy, sigmoid-crossentropy, ..., relu-hinge
UI_TIMEOUT_MS = 30_000  # the machine is slow and shared: one step may take many seconds
SERVER_START_SECONDS = 90
# The filters docs/readme-ui.md shows, each with the runs of this small study it must find (None: any).
README_FILTERS = {
    "params.activation = 'relu' and metrics.test_accuracy > 0.97": None,
    "params.loss = 'hinge' and metrics.test_accuracy > 0.91": None,
    "tags.config = 'relu-crossentropy'": {"relu-crossentropy"},
    "attributes.run_name LIKE 'relu-%'": {"relu-crossentropy", "relu-hinge"},
    "params.epochs = '1'": {"study", *config_names()},
    "tags.diverged = 'true'": None,
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(
    backend_store_uri: str, artifact_root: Path, log_path: Path
) -> Iterator[tuple[str, subprocess.Popen]]:
    """`mlflow server` on 127.0.0.1 (a free port) in its own process group, stopped whatever happens."""
    base_url = f"http://127.0.0.1:{free_port()}"
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        base_url.rsplit(":", 1)[1],
        "--backend-store-uri",
        backend_store_uri,
        "--default-artifact-root",
        str(artifact_root),
        "--workers",
        "1",
    ]
    # No job runner: it forks half a dozen huey consumers this test never uses.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with log_path.open("w") as server_log:
        server = subprocess.Popen(command, stdout=server_log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        yield base_url, server
    finally:
        _stop(server)


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (uvicorn and its worker), SIGKILL if it lingers."""
    started = time.monotonic()
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=15)
    with contextlib.suppress(ProcessLookupError):  # a worker left behind in the group
        os.killpg(process.pid, signal.SIGKILL)
    log.info("mlflow server stopped in %.1fs", time.monotonic() - started)


def wait_for_health(base_url: str, server: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + SERVER_START_SECONDS
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"mlflow server exited with {server.returncode}:\n{log_path.read_text()[-3000:]}")
        with contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError):
            with urllib.request.urlopen(f"{base_url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        time.sleep(0.5)
    pytest.fail(f"mlflow server not healthy after {SERVER_START_SECONDS}s:\n{log_path.read_text()[-3000:]}")


def require_browser():
    """Playwright's sync API, or a failure that says how to get Chromium (never a skip)."""
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: .ci/run installs it (apt-get update && apt-get install -y chromium); "
            "the UI test needs Debian's chromium, Playwright never downloads a browser"
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is missing: pip install -r requirements-dev.txt (the pip package only)")
    return sync_playwright


def test_ui_shows_the_study(small_mnist: Path, tracking_uri: str, tmp_path: Path) -> None:
    sync_playwright = require_browser()
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    client = MlflowClient()
    client.search_experiments()  # create the store's schema before the server and the study both open it
    log_path = tmp_path / "mlflow-server.log"
    started = time.monotonic()

    with mlflow_server(tracking_uri, tmp_path / "mlruns", log_path) as (base_url, server):
        # The server starts while the study trains (both take a while on this machine).
        result = run_cli("main", "--epochs", "1", "--data", str(small_mnist), "--workers", "2", cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        log.info("study trained and logged after %.0fs", time.monotonic() - started)
        wait_for_health(base_url, server, log_path)
        log.info("mlflow server healthy after %.0fs", time.monotonic() - started)

        experiment = client.get_experiment_by_name(keys.DEFAULT_EXPERIMENT)
        assert experiment.tags.get(keys.EXPERIMENT_KIND_TAG) == keys.EXPERIMENT_KIND
        runs = client.search_runs([experiment.experiment_id])
        (parent,) = [run for run in runs if MLFLOW_PARENT_RUN_ID not in run.data.tags]
        children = {run.info.run_name: run for run in runs if MLFLOW_PARENT_RUN_ID in run.data.tags}
        assert parent.info.run_name.startswith("study-")
        assert sorted(children) == sorted(CHILD_NAMES)

        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
            try:
                page = browser.new_page(viewport={"width": 1920, "height": 1080})
                page.set_default_timeout(UI_TIMEOUT_MS)
                try:
                    check_ui(page, client, base_url, experiment.experiment_id, parent, children)
                    log.info("UI checked after %.0fs", time.monotonic() - started)
                except BaseException:
                    with contextlib.suppress(Exception):
                        page.screenshot(path=SCREENSHOTS / "failure.png", full_page=True)
                        (SCREENSHOTS / "failure.txt").write_text(f"{page.url}\n\n{page.inner_text('body')}")
                    raise
            finally:
                browser.close()
        log.info("browser closed after %.0fs", time.monotonic() - started)


def check_ui(page, client: MlflowClient, base_url: str, experiment_id: str, parent, children: dict) -> None:
    """The UI steps; each one waits for what a person would see, then saves a screenshot."""
    from playwright.sync_api import expect

    # 1. The experiment opens (in MLflow 3.17's default GenAI mode: the experimentKind tag does not change
    # that); its sidebar offers "Training runs", which lists the study run.
    expect.set_options(timeout=UI_TIMEOUT_MS)
    page.goto(f"{base_url}/#/experiments/{experiment_id}")
    dismiss_popups(page)
    training_runs = page.get_by_role("link", name="Training runs", exact=True)
    expect(training_runs).to_be_visible()
    training_runs.click()
    expect(page.get_by_role("heading", name="Training runs")).to_be_visible()
    expect(page.get_by_role("link", name=parent.info.run_name, exact=True)).to_be_visible()
    page.screenshot(path=SCREENSHOTS / "1-training-runs.png")

    # The sidebar's "Model training" switch (what the README recommends) shows the same table as "Runs".
    page.get_by_text("Model training", exact=True).click()
    expect(page.get_by_role("heading", name="Runs", exact=True)).to_be_visible()
    expect(page.get_by_role("link", name=parent.info.run_name, exact=True)).to_be_visible()

    # 2. Expanding the study run shows its six configuration runs, by name.
    expand_study_run(page, parent.info.run_name)
    for name in CHILD_NAMES:
        expect(page.get_by_role("link", name=name, exact=True)).to_be_visible()
    page.screenshot(path=SCREENSHOTS / "2-expanded.png")

    # 3. A search filter narrows the table to the runs MLflow's search API returns for it.
    for search, expected in README_FILTERS.items():
        found = {
            "study" if run.info.run_id == parent.info.run_id else run.info.run_name
            for run in client.search_runs([experiment_id], search)
        }
        assert expected is None or found == expected, (search, found)
    relu_accuracies = sorted(children[f"relu-{loss}"].data.metrics[keys.TEST_ACCURACY] for loss in LOSSES)
    threshold = round(relu_accuracies[0] - 0.0005, 4)
    if relu_accuracies[0] != relu_accuracies[-1]:  # let the metric clause drop the weaker relu run
        threshold = round((relu_accuracies[0] + relu_accuracies[-1]) / 2, 5)
    search = f"params.activation = 'relu' and metrics.{keys.TEST_ACCURACY} > {threshold}"
    expected = {run.info.run_name for run in client.search_runs([experiment_id], search)}
    assert expected and all(name.startswith("relu-") for name in expected), expected
    box = page.get_by_placeholder("metrics.rmse", exact=False)
    box.fill(search)
    box.press("Enter")
    expect(page.get_by_text(f"{len(expected) + 1} matching runs")).to_be_visible()  # + the study run
    if not page.get_by_role("link", name=min(expected), exact=True).is_visible():
        expand_study_run(page, parent.info.run_name)
    for name in CHILD_NAMES:
        link = page.get_by_role("link", name=name, exact=True)
        if name in expected:
            expect(link).to_be_visible()
        else:
            expect(link).to_have_count(0)
    page.screenshot(path=SCREENSHOTS / "3-filter.png")

    # 4. The compare view of the six: activation, loss, val_accuracy and test_accuracy of each.
    ids = [children[name].info.run_id for name in CHILD_NAMES]
    query = urllib.parse.urlencode({"runs": json.dumps(ids), "experiments": json.dumps([experiment_id])})
    page.goto(f"{base_url}/#/compare-runs?{query}")
    expect(page.get_by_text("Comparing 6 Runs", exact=False)).to_be_visible()
    close_assistant(page)
    page.locator("tr", has=page.locator("th", has_text="Run Name:")).wait_for()
    columns = compare_columns(page)
    assert sorted(columns) == sorted(CHILD_NAMES), columns
    for key in ("activation", "loss"):
        shown = compare_param_row(page, key)
        assert shown == [children[name].data.params[key] for name in columns], (key, shown)
    for key in (keys.VAL_ACCURACY, keys.TEST_ACCURACY):
        shown = compare_metric_row(page, key, columns)
        for name in columns:
            logged = children[name].data.metrics[key]
            assert math.isclose(float(shown[name]), logged, abs_tol=0.0011), (key, name, shown[name], logged)
    page.screenshot(path=SCREENSHOTS / "4-compare.png", full_page=True)

    # 5. One configuration's run: its Artifacts tab shows the learning curves image.
    child = children["relu-crossentropy"]
    page.goto(f"{base_url}/#/experiments/{experiment_id}/runs/{child.info.run_id}")
    expect(page.get_by_role("heading", name="relu-crossentropy")).to_be_visible()
    page.get_by_role("tab", name="Artifacts").click()
    page.get_by_text(keys.LEARNING_CURVES, exact=True).first.click()
    image = page.locator(f'img[alt="{keys.LEARNING_CURVES}"]')
    expect(image).to_be_visible()
    page.wait_for_function(
        "alt => [...document.images].some(i => i.alt === alt && i.complete && i.naturalWidth > 0)",
        arg=keys.LEARNING_CURVES,
    )
    page.screenshot(path=SCREENSHOTS / "5-learning-curves.png")


def dismiss_popups(page) -> None:
    """Close what covers a fresh profile's first page: the modal "Detect Issues" guidance and the assistant.

    The guidance is modal (the rest of the page is hidden from clicks and from role locators), and it
    shows up a moment after the page, so it is waited for; a later MLflow without it only costs the wait.
    """
    with contextlib.suppress(Exception):
        page.get_by_role("button", name="Got it").click(timeout=20_000)
    close_assistant(page)


def close_assistant(page) -> None:
    close = page.locator('button[data-component-id="mlflow.assistant.chat_panel.close"]')
    if close.count() and close.first.is_visible():
        close.first.click()


def expand_study_run(page, parent_name: str) -> None:
    """Click the +/- button in the study run's row (the runs table is an ag-grid)."""
    row = page.locator('[role="row"]', has=page.get_by_role("link", name=parent_name, exact=True))
    row.locator('button[data-component-id*="runnamecellrenderer"]').click()


def compare_columns(page) -> list[str]:
    """The run names heading the compare table's columns, left to right."""
    run_names = page.locator("tr", has=page.locator("th", has_text="Run Name:")).locator("td")
    return [text.strip() for text in run_names.all_inner_texts()]


def compare_param_row(page, key: str) -> list[str]:
    row = page.locator("table.mlflow-compare-table tr", has=page.locator(f'th:text-is("{key}")')).first
    return [text.strip() for text in row.locator("td").all_inner_texts()]


METRIC_ROW_JS = """key => {
    const label = [...document.querySelectorAll('.ReactVirtualized__Grid a')].find(a => a.textContent.trim() === key);
    if (!label) return null;
    const cell = element => element.closest('.ReactVirtualized__Grid__innerScrollContainer > div');
    const labelGrid = label.closest('.ReactVirtualized__Grid');
    const [values] = [...document.querySelectorAll('.ReactVirtualized__Grid')].filter(grid => grid !== labelGrid);
    return [...values.querySelectorAll('.ReactVirtualized__Grid__innerScrollContainer > div')]
        .filter(value => value.style.top === cell(label).style.top)
        .map(value => {
            const box = value.getBoundingClientRect();
            return {text: value.innerText.trim(), x: box.x + box.width / 2};
        });
}"""


def compare_metric_row(page, key: str, columns: list[str]) -> dict[str, str]:
    """The value under each run's column in the row `key` of the compare page's metrics section.

    That section is two virtualized grids (names on the left, values on the right). In MLflow 3.17.2
    the names lag one wheel step behind the values when it is scrolled, so rows are matched by their
    position inside each grid (never scrolled here), and columns by where they sit under the run names.
    """
    page.wait_for_function(f"() => ({METRIC_ROW_JS})({json.dumps(key)})?.length === {len(columns)}")
    values = page.evaluate(METRIC_ROW_JS, key)
    cells = page.locator("tr", has=page.locator("th", has_text="Run Name:")).locator("td")
    shown = {}
    for index, name in enumerate(columns):
        box = cells.nth(index).bounding_box()
        (value,) = [value["text"] for value in values if box["x"] <= value["x"] <= box["x"] + box["width"]]
        shown[name] = value
    return shown

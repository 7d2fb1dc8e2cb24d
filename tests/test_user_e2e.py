"""End to end as a user: Airflow started for real, runs triggered through its REST API.

A fresh embedded home (`sd-pipeline setup`), then Airflow as `airflow standalone` runs it
(api-server, scheduler, dag-processor, triggerer). Through the public API, with a token
from the auth manager, the user triggers `sd_ingest`; its gate publishes the dataset
Asset, which starts `sd_train` by itself; the user also triggers `sd_train` by hand with
the conf the UI's trigger form sends (every param at its default, two changed). Checked:
both training runs succeed, the dataset version is committed and LATEST, each run
registered its model version in MLflow with the params it was given, the aliases point
where the promotion records say, bad params are refused naming the field, and the
trigger form opens in a real (headless) Chromium with the params' titles.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from airflow_stack import AirflowStack, airflow_stack

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = Path(os.environ.get("SD_TEST_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("SD_TEST_CHROMEDRIVER", "/usr/bin/chromedriver"))
SCREENSHOT_COPY = REPO / "test-output" / "trigger-form.png"
DEMO = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
MODEL, DATASET = DEMO["registry"]["model_name"], DEMO["dataset"]["name"]
DEFAULT_STEPS = 8  # the config's train.steps: what the form shows and an asset-triggered run uses
CHANGED = {"steps": 12, "seed": 1}  # what the user changes in the form
pytestmark = pytest.mark.slow


def _small_config(home: Path) -> Path:
    """configs/demo.yaml with few training steps and a short evaluation: minutes, not more."""
    config = copy.deepcopy(DEMO)
    config["train"]["steps"] = DEFAULT_STEPS
    config["evaluate"].update({"seeds": [0], "num_inference_steps": 4})
    path = home / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


class Report:
    """Timings and paths a person running the suite wants to see, shown past pytest's capture."""

    def __init__(self, config: pytest.Config) -> None:
        self.timings: dict[str, float] = {}
        self._capture = config.pluginmanager.get_plugin("capturemanager")

    def say(self, line: str) -> None:
        if self._capture is None:
            print(f"[user-e2e] {line}", flush=True)
            return
        with self._capture.global_and_fixture_disabled():
            print(f"\n[user-e2e] {line}", flush=True)

    def timed(self, name: str, started: float) -> None:
        self.timings[name] = round(time.perf_counter() - started, 1)
        self.say(f"{name}: {self.timings[name]:.1f}s")


@pytest.fixture(scope="module")
def report(pytestconfig: pytest.Config) -> Iterator[Report]:
    shown = Report(pytestconfig)
    yield shown
    shown.say(f"timings (s): {shown.timings}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, report: Report) -> Iterator[AirflowStack]:
    """`sd-pipeline setup` on a fresh home, then the four Airflow services on it."""
    started = time.perf_counter()
    home = tmp_path_factory.mktemp("user-home")
    config = _small_config(home)
    env = {**os.environ, "SD_PIPELINE_HOME": str(home), "GX_ANALYTICS_ENABLED": "false"}
    setup = subprocess.run(
        [str(Path(sys.executable).with_name("sd-pipeline")), "setup", "--config", str(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert setup.returncode == 0, f"sd-pipeline setup failed:\n{setup.stdout[-2000:]}\n{setup.stderr[-4000:]}"
    report.timed("setup", started)
    started = time.perf_counter()
    with airflow_stack(home, extra_env={"SD_PIPELINE_CONFIG": str(config)}, migrate=False) as running:
        running.wait_for_dags(["sd_ingest", "sd_train"])
        report.timed("airflow_up", started)
        yield running


def _form_conf(stack: AirflowStack, changes: dict[str, Any]) -> dict[str, Any]:
    """The conf the trigger form sends: every param's value as the form shows it, some edited.

    The UI builds its form from the same endpoint, so defaults come from the DAG, not from here.
    """
    params = stack.api_ok("GET", "/dags/sd_train/details")["params"]
    return {**{name: p["value"] for name, p in params.items()}, **changes}


def _trigger(stack: AirflowStack, dag_id: str, conf: dict[str, Any]) -> tuple[int, Any]:
    """POST a run the way the UI's Trigger button does (logical date: now; interval inferred)."""
    body = {
        "conf": conf,
        "logical_date": datetime.now(UTC).isoformat(),
        "data_interval_start": None,
        "data_interval_end": None,
    }
    return stack.api("POST", f"/dags/{dag_id}/dagRuns", body)


def _manual_runs(stack: AirflowStack, dag_id: str) -> set[str]:
    runs = stack.api_ok("GET", f"/dags/{dag_id}/dagRuns?run_type=manual&limit=100")["dag_runs"]
    return {r["dag_run_id"] for r in runs}


@pytest.fixture(scope="module")
def triggered(stack: AirflowStack, report: Report) -> dict[str, Any]:
    """New data, then a retrain by hand: what the user starts (training is left running)."""
    started = time.perf_counter()
    known_train = {r["dag_run_id"] for r in stack.api_ok("GET", "/dags/sd_train/dagRuns")["dag_runs"]}
    status, ingest = _trigger(stack, "sd_ingest", {})
    assert status == 200, ingest
    stack.wait_for_run("sd_ingest", ingest["dag_run_id"], timeout=300)
    report.timed("ingest_run", started)
    # The gate published the dataset Asset: the scheduler starts sd_train on the new version.
    # Waiting until that run is running before triggering ours fixes the order: with
    # max_active_runs=1, ours queues behind it.
    by_asset = stack.wait_for_new_run("sd_train", "asset_triggered", known_train)
    stack.wait_for_run("sd_train", by_asset["dag_run_id"], timeout=120, until=("running", "success"))
    conf = _form_conf(stack, CHANGED)
    status, manual = _trigger(stack, "sd_train", conf)
    assert status == 200, manual
    return {
        "ingest": ingest["dag_run_id"],
        "by_asset": by_asset["dag_run_id"],
        "manual": manual["dag_run_id"],
        "conf": conf,
        "started": started,
    }


@pytest.fixture(scope="module")
def finished(stack: AirflowStack, triggered: dict[str, Any], report: Report) -> dict[str, Any]:
    """Both training runs, waited for until they end (a failure shows the task logs)."""
    runs = {
        key: stack.wait_for_run("sd_train", triggered[key], timeout=900) for key in ("by_asset", "manual")
    }
    report.timed("ingest_and_both_training_runs", triggered["started"])
    for key in ("by_asset", "manual"):
        report.say(f"{key} run, seconds per task: {stack.task_durations('sd_train', triggered[key])}")
    return {**triggered, "runs": runs}


# -- what a user sees ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("param", "bad", "why"),
    [
        ("steps", 0, "is less than the minimum of 1"),
        ("method", "dreambooth", "is not one of ['lora', 'full']"),
    ],
)
def test_bad_params_are_refused_naming_the_field(stack: AirflowStack, param: str, bad: Any, why: str) -> None:
    before = _manual_runs(stack, "sd_train")
    status, answer = _trigger(stack, "sd_train", _form_conf(stack, {param: bad}))
    assert status == 400, answer
    assert f"Invalid input for param {param}: {bad!r} {why}" in answer["detail"]
    assert _manual_runs(stack, "sd_train") == before  # no run was created


@pytest.fixture(scope="module")
def chrome() -> Iterator[Any]:
    """Headless Chromium of the system, driven by its own chromedriver: nothing downloaded.

    Module-scoped and listed first by the test, so a missing browser fails before Airflow starts.
    """
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    if missing:
        pytest.fail(
            f"{', '.join(missing)} not found: this test drives the Airflow UI in a real browser. "
            "Install it with `apt-get install -y chromium chromium-driver` (.ci/run does), or set "
            "SD_TEST_CHROMIUM / SD_TEST_CHROMEDRIVER to their paths."
        )
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is not installed: `pip install -c constraints.txt -e '.[dev]'`")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
    # The window is tall enough for the whole trigger form.
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,2000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    yield driver
    driver.quit()


def test_trigger_form_shows_the_params(
    chrome: Any, stack: AirflowStack, triggered: dict[str, Any], tmp_path: Path, report: Report
) -> None:
    """Log in, open sd_train's Trigger form, screenshot it. (Training runs meanwhile.)"""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    started = time.perf_counter()
    params = stack.api_ok("GET", "/dags/sd_train/details")["params"]
    titles = [p["schema"]["title"] for p in params.values()]
    assert {"Training steps", "Method"} <= set(titles)
    driver = chrome
    wait = WebDriverWait(driver, 60, ignored_exceptions=(StaleElementReferenceException,))
    driver.get(f"{stack.url}/dags/sd_train")
    wait.until(ec.presence_of_element_located((By.NAME, "username"))).send_keys(stack.username)
    driver.find_element(By.NAME, "password").send_keys(stack.password)
    driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "[data-testid=trigger-dag-button]"))).click()

    def form(d: Any) -> Any:
        shown = [e for e in d.find_elements(By.CSS_SELECTOR, "[role=dialog]") if e.is_displayed()]
        return next((e for e in shown if all(t in e.text for t in titles)), False)

    try:
        dialog = wait.until(form)
    except Exception:
        driver.save_screenshot(str(tmp_path / "trigger-form-failed.png"))
        raise AssertionError(
            f"the trigger form never showed all of {titles}; page text:\n"
            f"{driver.find_element(By.TAG_NAME, 'body').text[:3000]}\n"
            f"screenshot: {tmp_path / 'trigger-form-failed.png'}"
        ) from None
    shot = tmp_path / "trigger-form.png"
    assert driver.save_screenshot(str(shot))
    text = dialog.text
    values = {
        e.get_attribute("name"): e.get_attribute("value")
        for e in dialog.find_elements(By.CSS_SELECTOR, "input[name^=element_]")
    }
    SCREENSHOT_COPY.parent.mkdir(exist_ok=True)
    shutil.copyfile(shot, SCREENSHOT_COPY)
    report.say(f"trigger form screenshot: {shot} (copy: {SCREENSHOT_COPY})")
    report.timed("browser", started)
    assert "Trigger Dag - sd_train" in text and "Run Parameters" in text
    assert "Full UNet fine-tune" in text  # the method's display name, from values_display
    # The form is filled with the config's values, as the API reports them.
    assert values["element_steps"] == str(DEFAULT_STEPS) == str(params["steps"]["value"])
    assert values["element_dataset_version"] == "latest"
    assert values["element_method"] == "full"
    assert shot.stat().st_size > 20_000  # a rendered page, not an empty canvas


def test_ingest_and_both_training_runs_succeed(finished: dict[str, Any]) -> None:
    runs = finished["runs"]
    assert runs["by_asset"]["run_type"] == "asset_triggered"
    assert runs["manual"]["run_type"] == "manual"
    assert runs["manual"]["triggered_by"] == "rest_api"
    assert runs["manual"]["triggering_user_name"] == "admin"
    assert runs["manual"]["conf"] == finished["conf"]
    assert {r["state"] for r in runs.values()} == {"success"}


def _store(stack: AirflowStack) -> Path:
    return Path(stack.env["SD_PIPELINE_HOME"]) / "store"


def test_dataset_version_is_committed_and_latest(stack: AirflowStack, finished: dict[str, Any]) -> None:
    """The version the gate published (the Asset event the UI shows) is committed and LATEST."""
    events = stack.api_ok("GET", "/assets/events?source_dag_id=sd_ingest")["asset_events"]
    assert [e["source_run_id"] for e in events] == [finished["ingest"]]  # one run, one event
    version = events[0]["extra"]["version"]
    datasets = _store(stack) / "datasets" / DATASET
    assert (datasets / "LATEST").read_text().strip() == version
    for marker in ("_COMMITTED", "DATACARD.md", "manifest.parquet", "quality/verdict.json"):
        assert (datasets / "versions" / version / marker).is_file(), marker
    assert events[0]["extra"]["accepted"] >= 100  # quality.min_rows of the config
    # The asset-triggered training run was started by exactly this event; the manual one by none.
    for key, wanted in (("by_asset", [events[0]["id"]]), ("manual", [])):
        upstream = stack.api_ok("GET", f"{stack.run_path('sd_train', finished[key])}/upstreamAssetEvents")
        assert [e["id"] for e in upstream["asset_events"]] == wanted, key


def test_each_run_registered_its_model_with_the_params_it_was_given(
    stack: AirflowStack, finished: dict[str, Any]
) -> None:
    from mlflow import MlflowClient

    home = Path(stack.env["SD_PIPELINE_HOME"])
    uri = f"sqlite:///{home}/mlflow/mlflow.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    versions = client.search_model_versions(f"name='{MODEL}'")
    mlflow_runs = {str(mv.version): client.get_run(str(mv.run_id)) for mv in versions}
    by_airflow_run = {r.data.tags.get("airflow.run_id"): v for v, r in mlflow_runs.items()}
    assert set(by_airflow_run) == {finished["by_asset"], finished["manual"]}  # one version per run
    latest = (_store(stack) / "datasets" / DATASET / "LATEST").read_text().strip()
    expected = {
        "by_asset": {"train.steps": str(DEFAULT_STEPS), "train.seed": "0"},
        "manual": {"train.steps": str(CHANGED["steps"]), "train.seed": str(CHANGED["seed"])},
    }
    for key, params in expected.items():
        run = mlflow_runs[by_airflow_run[finished[key]]]
        assert {k: run.data.params[k] for k in params} == params, key
        assert run.data.tags["dataset.version"] == latest, key
        assert run.data.metrics["holdout_loss"] > 0, key

    # The manual run was queued behind the asset-triggered one (max_active_runs=1): registered last.
    first, last = by_airflow_run[finished["by_asset"]], by_airflow_run[finished["manual"]]
    assert int(last) > int(first)
    assert str(client.get_model_version_by_alias(MODEL, "challenger").version) == last
    # The first version became champion; the second took it only if its promotion says so.
    decisions = {key: _promotion(stack, finished[key]) for key in ("by_asset", "manual")}
    assert (decisions["by_asset"]["model_version"], decisions["manual"]["model_version"]) == (first, last)
    assert decisions["by_asset"]["decision"] == "promoted"
    champion = last if decisions["manual"]["decision"] == "promoted" else first
    assert decisions["manual"]["champion"] == champion
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == champion


def _promotion(stack: AirflowStack, airflow_run_id: str) -> dict[str, Any]:
    """The promote task's recorded decision, read back through the API (its XCom)."""
    run = stack.run_path("sd_train", airflow_run_id)
    return dict(stack.api_ok("GET", f"{run}/taskInstances/promote/xcomEntries/return_value")["value"])

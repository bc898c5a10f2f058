"""The web dashboard in a real browser (headless Chromium driven by Selenium) on the real
stack: sign in, a refused upload shows its line, upload by drop and by picker, start a job,
watch its loss curve grow while it trains, see its checkpoints, models and jobs, and get an
answer in the playground from the adapter and from its base. Screenshots go to
test-artifacts/ui/ (gitignored) for a person to look at."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import httpx
import pytest

from tests.chaos.harness import Worker
from tests.e2e.stack import free_port, running, stack_env, tail_logs
from tests.factories import chat_rows, jsonl

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "ui"
WIDTH, HEIGHT = 1400, 1000
# Optimizer steps (batch size 1), each followed by a pause of the chaos worker (below), so
# training outlasts several of the event stream's 1 s polls on any machine and the page is
# seen drawing the curve while the job runs (at full speed a quiet machine once trained all
# 120 steps between two polls).
EXAMPLES, EPOCHS = 30, 4
STEP_PAUSE_S = "0.05"
STEPS = EXAMPLES * EPOCHS
T = TypeVar("T")


def browser_paths() -> tuple[str, str]:
    browser = next(
        (found for name in ("chromium", "chromium-browser") if (found := shutil.which(name))), None
    )
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.skip(
            "the dashboard's browser test needs chromium and chromedriver, and they are not "
            "installed here (.ci/services.sh installs them with apt-get where it can)"
        )
    return browser, driver


@pytest.fixture
def downloads(tmp_path) -> Path:
    return tmp_path / "downloads"


@pytest.fixture
def browser(downloads) -> Iterator:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = browser_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-dev-shm-usage",
        f"--window-size={WIDTH},{HEIGHT}",
        "--disable-extensions",
        "--no-first-run",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(30)
    downloads.mkdir()
    driver.execute_cdp_cmd(
        "Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)}
    )
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def stack(tmp_path, tiny_model_dir):
    """The API and the real worker, the latter through tests/chaos/fault_worker.py, which
    pauses `STEP_PAUSE_S` after each optimizer step and changes nothing else."""
    port, logs = free_port(), tmp_path / "logs"
    logs.mkdir()
    env = stack_env(
        tmp_path / "data", tiny_model_dir, OMP_NUM_THREADS="1",
        LORAFORGE_CHAOS_STEP_SLEEP=STEP_PAUSE_S,
    )  # fmt: skip
    subprocess.run([sys.executable, "-m", "app.cli", "db", "upgrade"], env=env, check=True)
    worker = Worker(env, logs, "ui")
    worker.start()
    try:
        with running([["api", "--port", str(port)]], env, logs, port) as running_stack:
            yield running_stack
    finally:
        worker.stop()


def wait(predicate: Callable[[], T], what: str, timeout: float = 60, every: float = 0.1) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := predicate():
            return found
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def shot(driver, name: str) -> None:
    """The whole page (the window grows to its height for the picture)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(WIDTH, min(max(HEIGHT, height), 4000))
    driver.save_screenshot(str(ARTIFACTS / f"{name}.png"))
    driver.set_window_size(WIDTH, HEIGHT)


def drop_file(driver, zone_id: str, name: str, content: str) -> None:
    """A file dropped on the zone as a person would drag it there (a real `drop` event)."""
    driver.execute_script(
        """
        const [zoneId, name, content] = arguments;
        const transfer = new DataTransfer();
        transfer.items.add(new File([content], name, {type: "application/jsonl"}));
        const zone = document.getElementById(zoneId);
        for (const type of ["dragover", "drop"]) {
          zone.dispatchEvent(new DragEvent(type, {dataTransfer: transfer, bubbles: true,
                                                  cancelable: true}));
        }
        """,
        zone_id,
        name,
        content,
    )


def test_dashboard_in_a_real_browser(browser, downloads, stack, tmp_path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    find = browser.find_element
    shutil.rmtree(ARTIFACTS, ignore_errors=True)  # this run's pictures only
    key = stack.key("acme")
    ui = f"{stack.base_url}/ui/"

    # Sign in: the key goes to session storage, never into a URL.
    browser.get(ui + "#/models")  # not signed in: the sign-in form, then the page asked for
    wait(lambda: browser.find_elements(By.ID, "api-key"), "the sign-in form")
    assert not find(By.ID, "nav").is_displayed()
    find(By.ID, "api-key").send_keys("lf-not-a-key")  # refused: the form says so, stays
    find(By.ID, "sign-in").click()
    refusal = wait(lambda: browser.find_elements(By.CSS_SELECTOR, "#sign-in-form .error"), "no")
    assert "API key" in refusal[0].text and browser.current_url.endswith("#/models")
    find(By.ID, "api-key").clear()
    find(By.ID, "api-key").send_keys(key)
    shot(browser, "01-sign-in")
    find(By.ID, "sign-in").click()
    wait(lambda: browser.find_elements(By.ID, "models-table"), "the models page")
    browser.get(ui)
    wait(lambda: browser.find_elements(By.ID, "jobs-table"), "the jobs page")
    # the table is drawn before the list arrives; the note shows once it has (empty)
    wait(lambda: find(By.CSS_SELECTOR, "#main p.muted").is_displayed(), "the jobs list")
    assert find(By.CSS_SELECTOR, "#main p.muted").text == "No jobs yet."
    shot(browser, "01b-no-jobs")
    assert key not in browser.current_url
    assert browser.execute_script("return sessionStorage.getItem('loraforge.apiKey')") == key

    # A refused file shows the API's message naming the line; its name stays text.
    browser.get(ui + "#/new")
    wait(lambda: browser.find_elements(By.ID, "training-file-drop"), "the create page")
    good_line = json.dumps(chat_rows(1)[0])
    drop_file(browser, "training-file-drop", "<b>bad</b>.jsonl", f"{good_line}\n{{not json\n")
    status = wait(
        lambda: browser.find_elements(By.CSS_SELECTOR, "#training-file-status .error"),
        "the validation error",
    )[0]
    assert "line 2" in status.text and "<b>bad</b>.jsonl" in status.text
    assert not browser.find_elements(By.CSS_SELECTOR, "#training-file-status b")
    assert not find(By.ID, "start-job").is_enabled()
    shot(browser, "02-validation-error")

    # Good files: training by drop, validation through the file picker.
    drop_file(browser, "training-file-drop", "train.jsonl", jsonl(chat_rows(EXAMPLES)).decode())
    validation = tmp_path / "valid.jsonl"
    validation.write_bytes(jsonl(chat_rows(4)))
    find(By.ID, "validation-file-input").send_keys(str(validation))
    for name in ("training-file", "validation-file"):
        wait(
            lambda name=name: browser.find_elements(By.CSS_SELECTOR, f"#{name}-status .ok"),
            f"the {name} upload",
        )
    assert find(By.ID, "base-model").get_attribute("value") == "tiny"
    chosen = {"n_epochs": str(EPOCHS), "batch_size": "1", "learning_rate_multiplier": "10"}
    for field, value in chosen.items():
        find(By.ID, f"hp-{field}").send_keys(value)
    find(By.ID, "suffix").send_keys("ui")
    shot(browser, "03-create-job")
    find(By.ID, "start-job").click()

    # The job page: the curve grows while the job trains (points arrive over the stream).
    wait(lambda: "#/jobs/ftjob-" in browser.current_url, "the job page")
    job_id = browser.current_url.rsplit("/", 1)[1]
    chart = wait(lambda: browser.find_elements(By.ID, "loss-chart"), "the chart")[0]
    badge = "#job-summary .badge"
    seen: list[tuple[int, str]] = []  # (points drawn, status shown), sampled while it runs
    running_shot: list[None] = []

    def ended() -> bool:
        # one read of the page: the summary is redrawn as events arrive
        points, status, stream = browser.execute_script(
            "return [document.getElementById('loss-chart').dataset.points,"
            f" document.querySelector('{badge}').dataset.status,"
            " document.querySelector('main').dataset.stream]"
        )
        seen.append((int(points), status))
        growing = {p for p, s in seen if p and s == "running"}
        if len(growing) == 2 and not running_shot:
            running_shot.append(shot(browser, "04-job-running"))  # once: the curve part-drawn
        return stream == "ended"

    try:
        wait(ended, "the job to end", timeout=300, every=0.2)
    except AssertionError:
        raise AssertionError(tail_logs(stack.logs)) from None
    while_running = sorted({points for points, status in seen if points and status == "running"})
    assert len(while_running) >= 2, f"the curve did not grow while the job ran: {while_running}"
    headers = {"Authorization": f"Bearer {key}"}
    job = httpx.get(f"{stack.base_url}/v1/fine_tuning/jobs/{job_id}", headers=headers).json()
    assert job["status"] == "succeeded", (job, tail_logs(stack.logs))
    assert int(chart.get_attribute("data-train-points")) == job["steps_planned"] == STEPS
    assert int(chart.get_attribute("data-valid-points")) >= 1
    assert find(By.CSS_SELECTOR, badge).text == "succeeded"
    resolved = dict(
        browser.execute_script(
            "return [...document.querySelectorAll('#hyperparameters dt')]"
            ".map(dt => [dt.textContent, dt.nextElementSibling.textContent])"
        )
    )
    assert [resolved[k] for k in ("n_epochs", "batch_size", "lora_r")] == [str(EPOCHS), "1", "8"]
    checkpoints = httpx.get(
        f"{stack.base_url}/v1/fine_tuning/jobs/{job_id}/checkpoints", headers=headers
    ).json()["data"]
    assert checkpoints  # the default retention keeps the newest few of the one per epoch
    expected = [c["fine_tuned_model_checkpoint"] for c in checkpoints]
    wait(
        lambda: (
            expected
            == browser.execute_script(
                "return [...document.querySelectorAll('#checkpoints tbody tr')]"
                ".map(row => row.dataset.checkpoint)"
            )
        ),
        "the job's checkpoints listed",
    )
    assert browser.find_elements(By.CSS_SELECTOR, "#events li[data-type='metrics']")
    shot(browser, "05-job-succeeded")

    # Jobs list and models registry.
    browser.get(ui + "#/jobs")
    # the list is redrawn every few seconds: read the row in one go, by script
    row = wait(
        lambda: browser.execute_script(
            f"return document.querySelector(\"tr[data-job='{job_id}']\")?.textContent"
        ),
        "the job's row",
    )
    assert "succeeded" in row and f"{STEPS}/{STEPS}" in row
    shot(browser, "06-jobs")
    model = job["fine_tuned_model"]
    browser.get(ui + "#/models")
    wait(lambda: browser.find_elements(By.CSS_SELECTOR, f"tr[data-model='{model}']"), "models")
    assert browser.find_elements(By.CSS_SELECTOR, "tr[data-model='tiny'][data-kind='base']")
    shot(browser, "07-models")

    # A second job can start from the files already uploaded.
    browser.get(ui + "#/new")
    picker = wait(lambda: browser.find_elements(By.ID, "training-file-existing"), "the picker")
    options = [o.get_attribute("value") for o in picker[0].find_elements(By.TAG_NAME, "option")]
    assert job["training_file"] in options and job["validation_file"] in options

    # The playground, reached from the job's model link: adapter and base side by side.
    browser.get(ui + f"#/jobs/{job_id}")
    wait(  # the summary is redrawn until the replayed stream has ended
        lambda: browser.execute_script("return document.querySelector('main').dataset.stream"),
        "the job page to settle",
    )
    find(By.LINK_TEXT, model).click()
    wait(lambda: browser.find_elements(By.ID, "prompt"), "the playground")
    assert find(By.ID, "model-left").get_attribute("value") == model
    assert find(By.ID, "model-right").get_attribute("value") == "tiny"
    find(By.ID, "prompt").send_keys("code for item 3?", Keys.ENTER)
    answers = {}
    for side in ("left", "right"):
        answers[side] = wait(
            lambda side=side: browser.find_elements(
                By.CSS_SELECTOR, f"#transcript-{side} .assistant[data-state='done']"
            ),
            f"the {side} answer",
        )[0].text
    assert answers["left"].strip() and "(empty answer)" not in answers["left"], answers
    shot(browser, "08-playground")

    # Models: download the adapter's zip (fetched with the key), then delete it.
    browser.get(ui + "#/models")
    row = wait(lambda: browser.find_elements(By.CSS_SELECTOR, f"tr[data-model='{model}']"), "row")
    row[0].find_element(By.XPATH, ".//button[text()='Download']").click()
    archive = wait(lambda: list(downloads.glob("*.zip")), "the download", timeout=30)[0]
    wait(lambda: archive.stat().st_size > 0 and not list(downloads.glob("*.crdownload")), "bytes")
    with zipfile.ZipFile(archive) as bundle:
        assert "adapter_model.safetensors" in bundle.namelist()
    row[0].find_element(By.XPATH, ".//button[text()='Delete']").click()
    browser.switch_to.alert.accept()
    wait(
        lambda: not browser.find_elements(By.CSS_SELECTOR, f"tr[data-model='{model}']"),
        "the row to go",
    )
    gone = httpx.get(f"{stack.base_url}/v1/models/{model}", headers=headers)
    assert gone.status_code == 404

    # The strict policy held: no script or style was refused on any page.
    refused = [
        entry["message"]
        for entry in browser.get_log("browser")
        if "Content Security Policy" in entry["message"]
    ]
    assert not refused, refused

"""The web page in a real browser over the real service: Debian's Chromium driven by Playwright, headless.

A real gunicorn serves the app (with API keys), a real Celery ingest worker checks uploads and a
real Celery worker trains, on Redis database 12 (flushed at the start). The test types the key,
uploads a tiny digits dataset and waits for its report, watches the job to the end, predicts, trains
a second version, rolls back, compares the two versions, and checks that the API's error messages
(an upload refused at once, a dataset the ingest worker failed) reach the page. Any console error or
page error fails it, except the "Failed to load resource" lines of the requests the error steps make
fail on purpose. Screenshots (desktop 1280x800, phone 390x844) go to test-artifacts/screenshots/.

Needs /usr/bin/chromium (`apt-get install chromium`) and Redis at 127.0.0.1:6379: it fails, never
skips, without them.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

from tests.live import GUNICORN, ROOT, fetch, flush_redis, free_port, multipart, server_env, wait_healthy
from tests.training.jobs.helpers import start_ingest_worker, start_worker, stop_worker
from training.demo import write_digits_dataset
from training.settings import Settings

REDIS_URL = "redis://127.0.0.1:6379/12"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
TRAINING_KEY = "browser-test-training-key"
PREDICTION_KEY = "browser-test-prediction-key"
SCREENSHOTS = ROOT / "test-artifacts" / "screenshots"
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
JOB_TIMEOUT_MS = 120_000
# Chromium logs every failed HTTP answer to the console; the error steps cause exactly these.
EXPECTED_FAILED_LOAD = re.compile(r"^Failed to load resource: the server responded with a status of (400|401)\b")

# Records every status and phase text the page shows, to prove it updated live from the event stream.
WATCH_SCRIPT = """
window.__seen = {status: [], phase: []};
new MutationObserver(() => {
  for (const [id, list] of [["job-status", window.__seen.status], ["job-phase", window.__seen.phase]]) {
    const node = document.getElementById(id);
    const text = node && node.textContent;
    if (text && list[list.length - 1] !== text) list.push(text);
  }
}).observe(document, {subtree: true, childList: true, characterData: true});
"""


@pytest.fixture(scope="module")
def web_settings(tmp_path_factory) -> Settings:
    flush_redis(REDIS_URL)
    root = tmp_path_factory.mktemp("web")
    return Settings(model_dir=root / "models", data_dir=root / "data", backbone_weights="none",
                    keras_home=root / "keras", celery_broker_url=REDIS_URL,
                    database_url=f"sqlite:///{root / 'data' / 'jobs.sqlite3'}")  # the worker's (worker_env)


@pytest.fixture(scope="module")
def service(web_settings, tmp_path_factory):
    """A real gunicorn API with keys, a real Celery training worker and ingest worker over one store, job DB and Redis
    database."""
    logs = tmp_path_factory.mktemp("web-logs")
    web_settings.data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    # THREADS: the page holds one thread with the job's event stream while it makes other calls.
    env = server_env(web_settings, PORT=str(port), WEB_CONCURRENCY="1", THREADS="8", CELERY_BROKER_URL=REDIS_URL,
                     DATABASE_URL=web_settings.database_url, TRAINING_API_KEY=TRAINING_KEY,
                     PREDICTION_API_KEY=PREDICTION_KEY)
    api_log = (logs / "api.log").open("wb")
    api = subprocess.Popen([str(GUNICORN), "-c", "gunicorn.conf.py", "wsgi:app"], cwd=ROOT, env=env,
                           stdout=api_log, stderr=subprocess.STDOUT)
    worker = start_worker(web_settings, REDIS_URL, logs / "worker.log")
    ingest = start_ingest_worker(web_settings, REDIS_URL, logs / "ingest.log")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, api, logs / "api.log")
        yield base
    finally:
        stop_worker(ingest)
        stop_worker(worker)
        if api.poll() is None:
            api.terminate()
            try:
                api.wait(30)
            except subprocess.TimeoutExpired:
                api.kill()
                api.wait(10)
        api_log.close()
        for name in ("api.log", "worker.log", "ingest.log"):
            print(f"--- {name} (end)\n{(logs / name).read_text(errors='replace')[-2500:]}")


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium, headless; a failure (never a skip) when it is not installed."""
    if not CHROMIUM.exists():
        pytest.fail(f"the browser test needs Chromium at {CHROMIUM}: apt-get install -y chromium", pytrace=False)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    """The tiny dataset as a zip, three held-out images (one per class), a file that is not an archive, and a zip
    of one class (an archive the ingest worker fails)."""
    root = tmp_path_factory.mktemp("web-files")
    held = write_digits_dataset(root / "digits", image_size=32, per_class=12, classes=3, holdout=3)
    archive = root / "digits.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        for path in sorted((root / "digits").rglob("*.png")):
            bundle.write(path, path.relative_to(root / "digits").as_posix())
        # For the report: a file that is not an image, and an exact copy (both skipped, with reasons).
        bundle.writestr("one/readme.txt", "not an image")
        first = sorted((root / "digits" / "two").glob("*.png"))[0]
        bundle.write(first, "two/copy-of-first.png")
    not_archive = root / "notes.zip"
    not_archive.write_text("these are notes, not a zip archive\n")
    classes = sorted(p.name for p in (root / "digits").iterdir() if p.is_dir())
    one_class = root / "ones.zip"
    with zipfile.ZipFile(one_class, "w") as bundle:
        for path in sorted((root / "digits" / classes[0]).glob("*.png")):
            bundle.write(path, f"{classes[0]}/{path.name}")
    return {"archive": archive, "images": sorted(held), "not_archive": not_archive, "one_class": one_class,
            "classes": classes}


def api_json(base: str, path: str, body: bytes | None = None, content_type: str | None = None) -> dict:
    headers = {"Authorization": f"Bearer {TRAINING_KEY}"}
    if content_type:
        headers["Content-Type"] = content_type
    status, raw = fetch(f"{base}{path}", body, headers)
    assert status < 300, (path, status, raw[:500])
    return json.loads(raw)


def api_error(base: str, path: str, body: bytes, content_type: str, key: str = TRAINING_KEY) -> str:
    status, raw = fetch(f"{base}{path}", body, {"Authorization": f"Bearer {key}", "Content-Type": content_type})
    assert 400 <= status < 500, (path, status, raw[:500])
    return json.loads(raw)["error"]["message"]


def predictions(base: str, images: list[Path], version: int) -> list[list[tuple[str, float]]]:
    """The API's own top-3 for the images, to compare with what the page shows."""
    body, content_type = multipart("image", [path.read_bytes() for path in images])
    answer = api_json(base, f"/v1/models/digits/predict?top_k=3&version={version}", body, content_type)
    assert answer["version"] == version
    return [[(item["label"], item["probability"]) for item in p["top_k"]] for p in answer["predictions"]]


def shown_predictions(page, version: int) -> list[list[tuple[str, float]]]:
    """The top-k lists the page shows for one version, per image, in order."""
    groups = page.locator(f'#try-results [role="group"][data-version="{version}"]')
    return [[(item.get_attribute("data-label"), float(item.get_attribute("data-probability")))
             for item in group.locator("li").all()] for group in groups.all()]


def assert_same_predictions(shown, expected) -> None:
    assert len(shown) == len(expected)
    for got, want in zip(shown, expected):
        assert [label for label, _ in got] == [label for label, _ in want]
        assert [p for _, p in got] == pytest.approx([p for _, p in want], abs=1e-6)


def screenshot(page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def wait_for_job(page, expect, previous: str | None = None) -> dict:
    """Wait until the page follows a job other than `previous` and that job ends; return what the page saw."""
    page.wait_for_function("(previous) => { const id = sessionStorage.getItem('classifier.job');"
                           " return id && id !== previous && document.getElementById('job-title')"
                           ".textContent.startsWith(`Job ${id.slice(0, 8)}`); }", arg=previous, timeout=30_000)
    expect(page.locator("#job-status")).to_have_text(re.compile("^(succeeded|failed|cancelled)$"),
                                                     timeout=JOB_TIMEOUT_MS)
    expect(page.locator("#job-status")).to_have_text("succeeded")
    expect(page.locator("#job-result")).to_be_visible(timeout=20_000)
    return page.evaluate("window.__seen")


def check_scores(page, expect, classes: list[str], scope: str) -> None:
    """Curves drawn, per-class table and confusion matrix of the version shown in `scope`."""
    per_class = page.locator(f"{scope} table.per-class tbody tr")
    expect(per_class).to_have_count(len(classes))
    assert [row.locator("th").inner_text() for row in per_class.all()] == classes
    for row in per_class.all():
        cells = [cell.inner_text() for cell in row.locator("td").all()]
        assert all(re.fullmatch(r"[01]\.\d{3}", value) for value in cells[:3]), cells  # precision, recall, F1
    matrix = page.locator(f"{scope} table.confusion tbody tr")
    expect(matrix).to_have_count(len(classes))
    counts = [[int(cell.inner_text()) for cell in row.locator("td").all()] for row in matrix.all()]
    supports = [int(row.locator("td").nth(3).inner_text()) for row in per_class.all()]
    assert [sum(row) for row in counts] == supports and sum(supports) > 0, (counts, supports)


@pytest.mark.slow
def test_the_page_trains_predicts_compares_and_reports_errors(service, browser, files, web_settings):
    from playwright.sync_api import expect

    base, classes = service, files["classes"]
    shutil.rmtree(SCREENSHOTS, ignore_errors=True)  # only this run's screenshots
    # The first train request imports TensorFlow in the API process (seconds on a busy machine).
    expect.set_options(timeout=30_000)
    context = browser.new_context(viewport=DESKTOP)
    context.add_init_script(WATCH_SCRIPT)
    page = context.new_page()
    console: list[tuple[str, str]] = []  # (step, message)
    step = ["load"]
    page.on("console", lambda message: console.append((step[0], message.text)) if message.type == "error" else None)
    page.on("pageerror", lambda error: console.append((step[0], f"page error: {error}")))
    try:
        # The page loads without a key and asks for one.
        page.goto(base + "/")
        expect(page.locator("#key-state")).to_have_text("enter a key to use the service")
        page.get_by_label("API key").fill(TRAINING_KEY)
        page.get_by_role("button", name="Use key").click()
        expect(page.get_by_text("No models yet")).to_be_visible()

        # New model: upload the archive (202 at once), wait for the ingest worker's report.
        step[0] = "upload"
        page.get_by_role("tab", name="New model").click()
        page.get_by_label("Dataset archive").set_input_files(files["archive"])
        expect(page.locator("#upload-state")).to_have_text("digits.zip: ready to train.")
        report = page.locator("#dataset-report")
        expect(report).to_contain_text(f"{11 * len(classes)} images in {len(classes)} classes")
        rows = report.locator("table.class-counts tbody tr")
        expect(rows).to_have_count(len(classes))
        assert [row.locator("th").inner_text() for row in rows.all()] == classes
        expect(report.get_by_role("list", name="Warnings")).to_contain_text("few images")
        expect(report.locator("summary")).to_have_text(["Skipped files (2)", "Duplicates dropped (1)"])
        skipped = report.locator("table.skipped tbody tr")
        expect(skipped).to_have_count(2)
        expect(skipped.filter(has_text="two/copy-of-first.png")).to_contain_text("duplicate of two/")
        expect(skipped.filter(has_text="one/readme.txt")).to_have_count(1)
        expect(page.get_by_label("Model name")).to_have_value("digits")
        screenshot(page, "desktop-new-model")

        # Train: few epochs at 32 px, then watch the job end.
        step[0] = "train"
        page.get_by_label("Epochs").fill("6")
        page.get_by_label("Image size (px)").fill("32")
        page.get_by_label("Optimizer").select_option("adam")
        page.get_by_role("button", name="Start training").click()
        expect(page.get_by_role("tab", name="Training")).to_have_attribute("aria-selected", "true")
        seen = wait_for_job(page, expect)
        assert "running" in seen["status"] and seen["status"][-1] == "succeeded", seen  # live, from the stream
        expect(page.get_by_label("Training progress")).to_have_js_property("value", 1)
        expect(page.locator("#job-phase")).to_contain_text("Done: version 1 of digits (published)")
        job_id = page.evaluate("sessionStorage.getItem('classifier.job')")
        job = api_json(base, f"/v1/jobs/{job_id}")
        epochs = len(job["progress"]["history"]["head"]["epoch"])  # the per-epoch history in the job record
        assert 1 <= epochs <= 6 and job["progress"]["history"]["head"]["val_accuracy"][-1] is not None, job
        for chart in ("#loss-chart", "#accuracy-chart"):
            expect(page.locator(chart)).to_have_attribute("data-series", "2")
            expect(page.locator(chart)).to_have_attribute("data-points", str(epochs))
            assert page.locator(f"{chart} polyline").count() == 2
        check_scores(page, expect, classes, "#job-result")
        screenshot(page, "desktop-training")

        # A reload keeps the key and the followed job, and redraws the curves.
        step[0] = "reload"
        page.reload()
        expect(page.locator("#job-status")).to_have_text("succeeded")
        expect(page.locator("#loss-chart")).to_have_attribute("data-points", str(epochs))
        expect(page.locator("#job-result table.per-class tbody tr")).to_have_count(len(classes))

        # Try it: pick the held-out images, see the same top-k as the API gives.
        step[0] = "predict"
        page.get_by_role("tab", name="Try it").click()
        try_it = page.get_by_role("tabpanel", name="Try it")
        expect(try_it.get_by_role("combobox", name="Model", exact=True)).to_have_value("digits")
        page.get_by_label("Images to classify").set_input_files(files["images"])
        expect(page.locator("#try-results section.result")).to_have_count(len(files["images"]))
        shown = shown_predictions(page, 1)
        assert all({label for label, _ in top} == set(classes) for top in shown), shown
        assert_same_predictions(shown, predictions(base, files["images"], 1))

        # A second version, then roll back to the first from the model list.
        step[0] = "second version"
        page.get_by_role("tab", name="New model").click()
        expect(page.locator("#dataset-report")).to_contain_text(f"{11 * len(classes)} images")  # kept over the reload
        expect(page.get_by_label("Or use an uploaded dataset")).to_have_value(job["dataset"])
        page.get_by_label("Model name").fill("digits")
        page.get_by_label("Image size (px)").fill("32")
        page.get_by_label("Epochs").fill("3")
        page.get_by_label("Optimizer").select_option("nesterov")
        page.get_by_role("button", name="Start training").click()
        wait_for_job(page, expect, previous=job_id)
        expect(page.locator("#job-phase")).to_contain_text("Done: version 2 of digits")
        page.get_by_role("tab", name="Models").click()
        row = page.locator('#models-table tr[data-model="digits"]')
        expect(row.locator("td").first).to_have_text("1, 2")
        page.get_by_label("Version of digits to publish").select_option("1")
        page.get_by_role("button", name="Publish the chosen version of digits").click()
        expect(row.locator("td.published")).to_have_text("1")
        expect(page.get_by_role("status")).to_contain_text("Published digits version 1")
        assert api_json(base, "/v1/models/digits")["published"] == 1
        page.get_by_role("button", name="Details of digits").click()
        expect(page.locator("#versions-table tbody tr")).to_have_count(2)
        check_scores(page, expect, classes, "#details-body")
        screenshot(page, "desktop-models")

        # Compare the two versions side by side on the same images.
        step[0] = "compare"
        page.get_by_role("tab", name="Try it").click()
        try_it.get_by_role("combobox", name="Version", exact=True).select_option("1")
        try_it.get_by_role("combobox", name="Compare with").select_option("2")
        expect(page.locator('#try-results [role="group"][data-version="2"]')).to_have_count(len(files["images"]))
        expect(page.locator("#try-state")).to_contain_text("versions 1 and 2")
        assert_same_predictions(shown_predictions(page, 1), predictions(base, files["images"], 1))
        assert_same_predictions(shown_predictions(page, 2), predictions(base, files["images"], 2))
        screenshot(page, "desktop-try-compare")
        page.set_viewport_size(PHONE)
        assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]  # no sideways scrolling
        screenshot(page, "phone-try-compare")
        page.get_by_role("tab", name="Training").click()
        expect(page.locator("#job-result")).to_be_visible()
        assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
        screenshot(page, "phone-training")
        page.set_viewport_size(DESKTOP)

        # Cancel a running job from the training view, once its curves are growing live from the job's
        # per-epoch history (features are cached by now: the head starts at once). No version is written.
        step[0] = "cancel"
        previous = page.evaluate("sessionStorage.getItem('classifier.job')")
        page.get_by_role("tab", name="New model").click()
        page.get_by_label("Epochs").fill("5000")
        page.get_by_label("Early-stopping patience").fill("5000")
        page.get_by_role("button", name="Start training").click()
        page.wait_for_function("(previous) => { const id = sessionStorage.getItem('classifier.job');"
                               " return id && id !== previous; }", arg=previous)
        expect(page.locator("#job-phase")).to_contain_text(re.compile(r"Head training: epoch \d+ of 5000"),
                                                           timeout=JOB_TIMEOUT_MS)
        expect(page.locator("#loss-chart")).to_have_attribute("data-points", re.compile(r"^([2-9]|\d{2,})$"))
        expect(page.locator("#loss-chart polyline")).to_have_count(2)
        page.get_by_role("button", name="Cancel").click()
        expect(page.locator("#job-status")).to_have_text("cancelled", timeout=JOB_TIMEOUT_MS)
        expect(page.locator("#job-phase")).to_have_text("Cancelled.")
        expect(page.get_by_role("button", name="Cancel")).to_be_disabled()
        expect(page.locator("#loss-chart polyline")).to_have_count(2)  # the epochs it ran stay drawn
        screenshot(page, "desktop-cancelled")
        assert api_json(base, "/v1/models/digits")["published"] == 1
        assert [v["version"] for v in api_json(base, "/v1/models/digits")["versions"]] == [1, 2]
        assert not console, console

        # Errors: the API's message appears in the alert region.
        step[0] = "errors"
        page.get_by_role("tab", name="New model").click()
        page.get_by_label("Dataset archive").set_input_files(files["not_archive"])
        body, content_type = multipart("file", [files["not_archive"].read_bytes()], names=["notes.zip"])
        message = api_error(base, "/v1/datasets", body, content_type)
        assert "'notes.zip'" in message, message  # the error names the user's own file
        alert = page.get_by_role("alert")
        expect(alert).to_be_visible()
        expect(alert).to_contain_text(message)
        expect(alert).to_contain_text("HTTP 400")
        expect(page.get_by_role("button", name="Start training")).to_be_disabled()
        page.get_by_role("button", name="Dismiss message").click()
        expect(alert).to_be_hidden()

        # An archive accepted at once (202) that the ingest worker fails: its record's error reaches the page.
        page.get_by_label("Dataset archive").set_input_files(files["one_class"])
        expect(alert).to_contain_text("ones.zip cannot be trained on: ")
        dataset_id = hashlib.sha256(files["one_class"].read_bytes()).hexdigest()[:16]
        failed = api_json(base, f"/v1/datasets/{dataset_id}")
        assert failed["status"] == "failed" and "at least 2 classes" in failed["error"], failed
        expect(alert).to_contain_text(failed["error"])
        expect(page.locator("#upload-state")).to_have_text("ones.zip: not accepted.")
        expect(page.get_by_role("button", name="Start training")).to_be_disabled()
        page.get_by_role("button", name="Dismiss message").click()

        page.get_by_label("API key").fill("not-the-key")
        page.get_by_role("button", name="Use key").click()
        page.get_by_role("tab", name="Models").click()
        expect(alert).to_contain_text("unknown API key")
        expect(alert).to_contain_text("HTTP 401")
        screenshot(page, "desktop-error")

        step[0] = "end"
        unexpected = [(where, text) for where, text in console
                      if not (where == "errors" and EXPECTED_FAILED_LOAD.match(text))]
        assert not unexpected, unexpected
        # The listener does see console errors: the two failed requests above were logged.
        assert len([text for where, text in console if where == "errors"]) >= 2, console
    except Exception:
        screenshot(page, "failure")
        raise
    finally:
        context.close()

"""End to end: `make dashboard` on 127.0.0.1, opened in a real headless Chromium (Debian's, driven by Playwright).

On the same folder of real short runs as tests/test_dashboard.py: the page loads, every view renders with no
exception box, a filter change in the sidebar updates a chart and the address, the downloads work, a shared
link restores the view; a screenshot of each view is taken (into a temporary folder, so a test run leaves the
tree clean; `make screenshots` writes them to docs/screenshots/, which the README and docs link).
Needs /usr/bin/chromium (`make browser` installs it; Playwright downloads no browser). Without it the test
skips, and fails under CI (CI=true), where the browser is part of what `make test` installs.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import json
import os
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from shared import stats
from tests.conftest import REPO, free_port
from tests.test_dashboard import build_fixture

pytestmark = pytest.mark.slow  # real launches or a browser: `make test-fast` leaves these out

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
# ../shared/ENVIRONMENT.md section 6: these flags make Debian's Chromium start headless in a container.
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SHOTS = Path(os.environ.get("DISTBENCH_SCREENSHOTS") or tempfile.mkdtemp(prefix="distbench-shots-"))
RESULTS = REPO / "docs" / "results" / "2026-11-29"  # the runs behind the README's speed tables
# `make project-validate`'s records: projection + the real runs it checked
PROJECTION = REPO / "docs" / "results" / "2026-11-30" / "projection-overheads"
# `make project` on the study's 2 x T4 (modelled compute, ranges and verdicts): the README's screenshot
PROJECTION_GPU = REPO / "docs" / "results" / "2026-12-07" / "projection"
STALE_S = 600
VIEWS = {
    "Speedup": "speedup_fixture",
    "Overview": "overview",
    "Step time": "step_time",
    "Scaling": "scaling",
    "Curves": "curves",
    "Throughput & memory": "throughput_memory",
    "Compare runs": "compare_runs",
    "Seeds": "seeds",
    "Projection": "projection_empty",
}


def need_browser():
    if not os.access(CHROMIUM, os.X_OK):
        msg = f"no Chromium at {CHROMIUM}: run `make browser` (apt-get install chromium) or set CHROMIUM"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)


@contextlib.contextmanager
def dashboard(runs_dir: Path, log: Path, **env):
    """`make dashboard` on a free port, as a user starts it; the whole process group is stopped afterwards."""
    port = free_port()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            ["make", "-s", "dashboard", f"RUNS_DIR={runs_dir}", f"PORT={port}"],
            cwd=REPO,
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, f"make dashboard exited {proc.returncode}:\n{log.read_text()[-3000:]}"
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"no health answer in 90 s:\n{log.read_text()[-3000:]}"
            time.sleep(0.3)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    need_browser()
    dirs = build_fixture(tmp_path_factory.mktemp("dashboard_e2e"))
    env = {
        "REFERENCE_DIR": str(dirs["reference"]),
        "DASHBOARD_REFRESH_S": "1",
        "DASHBOARD_STALE_S": str(STALE_S),
    }
    with dashboard(dirs["runs"], tmp_path_factory.mktemp("server") / "server.log", **env) as url:
        yield url, dirs


@pytest.fixture(scope="module")
def browser(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield b
        b.close()


def open_page(browser, url: str):
    page = browser.new_page(viewport={"width": 1400, "height": 1100}, accept_downloads=True)
    page.goto(url)
    page.wait_for_selector("h1:has-text('distbench')", timeout=60_000)
    page.wait_for_selector("[role='tabpanel']:visible .js-plotly-plot .main-svg", timeout=60_000)
    return page


def panel(page):
    return page.locator("[role='tabpanel']:visible").first


def show_tab(page, label: str):
    page.get_by_role("tab", name=label).click()
    p = panel(page)
    p.locator(
        ".js-plotly-plot .main-svg, [data-testid='stDataFrame'], [data-testid='stAlert']"
    ).first.wait_for(timeout=30_000)
    page.wait_for_timeout(500)  # Plotly finishes its layout after the element appears
    return p


def legend(page) -> list[str]:
    return panel(page).locator(".js-plotly-plot .legendtext").all_text_contents()


def test_page_views_filter_downloads_and_screenshots(server, browser, tmp_path):
    url, dirs = server
    SHOTS.mkdir(parents=True, exist_ok=True)
    page = open_page(browser, url)
    assert page.locator(".stException, [data-testid='stException']").count() == 0
    page.get_by_text(
        "could not be read and are not shown"
    ).first.click()  # the notice, folded under the answer
    notice = page.locator("[data-testid='stAlert']").first.inner_text()
    assert "could not be read" in notice and "nested too deeply" in notice and "too large" in notice
    assert "Traceback" not in page.content() and str(dirs["runs"]) not in notice  # no local paths
    page.screenshot(path=SHOTS / "page.png")

    page.set_viewport_size({"width": 1400, "height": 2000})  # a whole view fits: no inner scrolling
    for label, name in VIEWS.items():
        p = show_tab(page, label)
        p.screenshot(path=SHOTS / f"{name}.png")
        assert page.locator(".stException, [data-testid='stException']").count() == 0, label

    show_tab(page, "Curves")
    before = legend(page)
    assert "cpu_1proc" in before and "cpu_2proc" in before and any(n.startswith("study ") for n in before)
    model = page.locator("[data-testid='stSidebar'] [data-testid='stMultiSelect']").filter(has_text="Model")
    model.locator("input").click()
    page.keyboard.type("conv_autoencoder")
    page.keyboard.press("Enter")
    page.keyboard.press("Escape")
    page.wait_for_function("() => location.search.includes('model=conv_autoencoder')", timeout=30_000)
    deadline = time.monotonic() + 30

    def conv_only(names):  # the autoencoder's one run of ours and the study's two
        return names and "cpu_2proc" not in names and len(names) == 3

    while not conv_only(after := legend(page)) and time.monotonic() < deadline:  # until the rerun has drawn
        page.wait_for_timeout(300)
    assert conv_only(after), after
    assert sum(n.startswith("study ") for n in after) == 2
    panel(page).screenshot(path=SHOTS / "curves_filtered.png")
    assert page.locator(".stException, [data-testid='stException']").count() == 0

    with page.expect_download() as dl:
        page.get_by_role("button", name="Filtered table (CSV)").click()
    rows = list(csv.DictReader(open(dl.value.path())))
    assert rows and {r["model"] for r in rows} == {"conv_autoencoder"}
    with page.expect_download() as dl:
        panel(page).get_by_role("button", name="HTML").click()
    html = Path(dl.value.path()).read_text()
    assert (
        dirs["ids"]["ae"] in html and "Plotly.newPlot" in html and "<script src=" not in html
    )  # plotly.js inline: opens offline
    page.close()

    shared = open_page(browser, f"{url}/?model=mlp&x=samples+seen&ema=0&view=Curves")  # a link restores it
    assert shared.get_by_role("tab", name="Curves").get_attribute("aria-selected") == "true"
    assert "vs samples seen" in panel(shared).locator(".js-plotly-plot .gtitle").first.text_content()
    names = legend(shared)
    assert "cpu_1proc" in names and not any("Conv" in n for n in names)
    shared.close()


def metrics(page) -> dict[str, int]:
    out = {}
    for m in page.locator("[data-testid='stMetric']").all():
        label = m.locator("[data-testid='stMetricLabel']").inner_text().strip()
        value = m.locator("[data-testid='stMetricValue']").inner_text().strip()
        if value.isdigit():
            out[label] = int(value)
    return out


def wait_until(page, condition, what: str, timeout_s: float = 30):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"page did not show {what} within {timeout_s:g} s"
        page.wait_for_timeout(300)


def test_page_refreshes_itself_and_a_stale_heartbeat_turns_crashed(server, browser):
    """No reload: a new `running` record appears, then shows as crashed once its heartbeat passes the timeout."""
    url, dirs = server
    page = open_page(browser, url)
    before = metrics(page)
    assert before["running"] >= 1  # the fixture's live run: the page watches the folder
    rec = json.loads((dirs["runs"] / "mlp-fixture-live.json").read_text())
    path = dirs["runs"] / "mlp-fixture-going-stale.json"
    beat = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=STALE_S - 5)  # goes stale in 5 s
    rec.update(run_id=path.stem, updated_at=beat.isoformat(timespec="milliseconds"))
    tmp = path.with_suffix(".part")
    try:
        tmp.write_text(json.dumps(rec))
        os.replace(tmp, path)  # atomic, like the record writer
        wait_until(
            page,
            lambda: (
                metrics(page).get("runs shown") == before["runs shown"] + 1
                and metrics(page).get("running") == before["running"] + 1
            ),
            "the new running run",
        )
        wait_until(
            page,
            lambda: (
                metrics(page).get("running") == before["running"]
                and metrics(page).get("crashed / failed") == before["crashed / failed"] + 1
            ),
            "it crashed",
        )
        assert page.locator(".stException, [data-testid='stException']").count() == 0
    finally:
        path.unlink(missing_ok=True)
        page.close()


def test_speedup_view_on_the_committed_results(browser, tmp_path_factory):
    """The README's screenshots: the Speedup and Overview views on the real runs in docs/results/."""
    with dashboard(RESULTS, tmp_path_factory.mktemp("results_server") / "server.log") as url:
        page = open_page(browser, url)
        page.set_viewport_size({"width": 1400, "height": 2400})
        assert page.locator(".stException, [data-testid='stException']").count() == 0
        p_ = show_tab(page, "Speedup")
        assert p_.locator(".js-plotly-plot .errorbar").count() > 0  # intervals are drawn
        p_.screenshot(path=SHOTS / "results_speedup.png")
        show_tab(page, "Overview").screenshot(path=SHOTS / "results_overview.png")
        assert page.locator(".stException, [data-testid='stException']").count() == 0
        page.close()


def test_projection_view_on_the_committed_projection(browser, tmp_path_factory):
    """The Projection tab on the committed `make project-validate` output: projected curves per strategy with
    the measured points over them, the answer sentence and the validation table (the README's screenshot)."""
    with dashboard(PROJECTION, tmp_path_factory.mktemp("projection_server") / "server.log") as url:
        page = open_page(browser, url)
        page.set_viewport_size({"width": 1400, "height": 1500})
        p_ = show_tab(page, "Projection")
        p_.locator(".js-plotly-plot .main-svg").first.wait_for(timeout=30_000)
        names = legend(page)
        assert "ddp (measured compute)" in names and "ddp (measured)" in names, names
        assert "pipeline_1f1b (measured compute)" in names
        text = p_.inner_text()
        assert "pays off" in text and "Validation: mean |error|" in text
        assert p_.locator(".js-plotly-plot .errorbar").count() > 0  # measured points carry their range
        assert page.locator(".stException, [data-testid='stException']").count() == 0
        p_.screenshot(path=SHOTS / "projection_cpu.png")
        page.close()


@pytest.mark.parametrize("width", [1280, 1600])
def test_projection_view_draws_ranges_labels_and_verdicts(browser, tmp_path_factory, width):
    """The Projection tab on a committed GPU projection (modelled compute): every curve labelled measured or
    modelled, its range a shaded band, and one verdict line per N (the README's screenshot at 1600 px)."""
    with dashboard(PROJECTION_GPU, tmp_path_factory.mktemp("projection_gpu") / "server.log") as url:
        page = open_page(browser, url)
        page.set_viewport_size({"width": width, "height": 1500})
        p_ = show_tab(page, "Projection")
        p_.locator(".js-plotly-plot .main-svg").first.wait_for(timeout=30_000)
        names = legend(page)
        assert "ddp (modelled compute)" in names, names
        fills = p_.locator(".js-plotly-plot .scatterlayer .js-fill")
        assert fills.count() > 0  # the bands
        text = p_.inner_text()
        assert "Verdicts" in text and "N = 2 (strong scaling)" in text
        assert any(v in text for v in ("pays off", "does not pay off", "cannot tell"))
        assert "compute modelled from t4-pcie" in text  # the newest record: t4-pcie
        assert page.locator(".stException, [data-testid='stException']").count() == 0
        if width == 1600:
            p_.screenshot(path=SHOTS / "projection.png")
        page.close()


OVERLAP_JS = """() => [...document.querySelectorAll("[role=tabpanel] .js-plotly-plot")]
  .filter(p => p.offsetParent !== null)
  .map(p => {
    const box = e => { const b = e.getBoundingClientRect(); return [b.left, b.top, b.right, b.bottom]; };
    const legend = p.querySelector(".legend .bg") || p.querySelector(".legend");
    const title = p.querySelector(".gtitle");
    return {
      title: title && title.textContent ? box(title) : null,
      legend: legend && legend.getBoundingClientRect().width > 0 ? box(legend) : null,
      areas: [...p.querySelectorAll(".nsewdrag")].map(box),
      ticks: [...p.querySelectorAll(".xtick text, .ytick text")]
        .filter(e => e.textContent).map(e => [e.textContent, e.getBoundingClientRect().height]),
    };
  })"""


def overlap(a, b, tol: float = 2.0) -> bool:
    return (
        a is not None
        and b is not None
        and min(a[2], b[2]) - max(a[0], b[0]) > tol
        and min(a[3], b[3]) - max(a[1], b[1]) > tol
    )


@pytest.mark.parametrize("folder", ["fixture", "docs/results"])
@pytest.mark.parametrize("width", [1280, 1600])
def test_every_view_reads_at_1280_and_1600(browser, server, tmp_path_factory, folder, width):
    """Every tab at both widths, on a fresh bench-style folder and on every committed result: no exception,
    no console error, no legend over a title or a plot, no title over a plot, labels not shrunk below
    reading size; a verdict line per model above the tabs; on docs/results the Projection bands."""
    runs = server[1]["runs"] if folder == "fixture" else REPO / "docs" / "results"
    env = {"REFERENCE_DIR": str(server[1]["reference"])} if folder == "fixture" else {}
    with dashboard(runs, tmp_path_factory.mktemp("views") / "server.log", **env) as url:
        page = browser.new_page(viewport={"width": width, "height": 1400})
        errors = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url)
        page.wait_for_selector("h1:has-text('distbench')", timeout=60_000)
        page.wait_for_selector("[role='tabpanel']:visible .js-plotly-plot .main-svg", timeout=60_000)
        answer = (
            page.locator("[data-testid='stMarkdownContainer'] li").filter(has_text="Best:").all_inner_texts()
        )
        assert answer and all(any(v in line for v in stats.VERDICTS) for line in answer), answer
        models = [line.split(" on ")[0] for line in answer]
        assert len(models) == len(set(models)) or folder != "fixture"  # one line per model (and hardware)
        for label in VIEWS:
            p_ = show_tab(page, label)
            assert page.locator(".stException, [data-testid='stException']").count() == 0, label
            for k, plot in enumerate(page.evaluate(OVERLAP_JS)):
                where = f"{label} plot {k} at {width} px on {folder}"
                assert not overlap(plot["legend"], plot["title"]), f"{where}: legend over the title"
                for area in plot["areas"]:
                    assert not overlap(plot["legend"], area), f"{where}: legend over a plot"
                    assert not overlap(plot["title"], area), f"{where}: title over a plot"
                small = [t for t in plot["ticks"] if 0 < t[1] < 9]  # 0: a label Plotly hides
                assert not small, f"{where}: labels shrunk below reading size: {small[:5]}"
            if label == "Projection" and folder != "fixture":
                p_.locator(".js-plotly-plot .main-svg").first.wait_for(timeout=30_000)
                assert p_.locator(".js-plotly-plot .scatterlayer .js-fill").count() > 0  # the bands
        assert not errors, errors
        page.close()

"""The rendered report as a reader's browser shows it: `cartlab report` on conftest's tiny study,
then reports/<study>/index.html and every notebook page beside it opened in headless Chromium
(Debian's `chromium` and `chromium-driver`, which .ci/run installs) through Selenium. Guards what
no file check sees: every image decodes, the page logs no error (it fetches nothing, so it works
offline), the tables carry no pandas index, no NaN, no empty column and no whole number written
as a float, and every figure has a title and labelled axes.

    python -m pytest -q tests/test_report_browser.py

Slow: it trains the tiny study (once per session, shared with test_notebooks.py) and renders its
report (once per session too). Skipped, saying so, on a machine without chromium; in CI (CI set) a missing browser fails.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest


pytestmark = pytest.mark.slow

CHROME_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage")
# columns that hold whole numbers wherever they appear in a report table
INTEGER_COLUMNS = {"d_model", "n_loops", "prelude_layers", "n_layers", "seed", "n_seeds", "n", "seeds", "stored_params",
                   "effective_params", "tokens"}

IMAGES_JS = "return Array.from(document.images).map(i => [i.currentSrc.slice(0, 60), i.complete, i.naturalWidth]);"
TABLES_JS = """return Array.from(document.querySelectorAll('table')).map(t => ({
    header: Array.from(t.querySelectorAll('thead th')).map(c => c.textContent.trim()),
    row_headers: t.querySelectorAll('tbody th').length,
    rows: Array.from(t.querySelectorAll('tbody tr')).map(r => Array.from(r.querySelectorAll('td')).map(c => c.textContent.trim())),
}));"""


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Chromium driven by Debian's chromedriver: no driver or browser is downloaded
    (Selenium Manager is never asked, both paths are given). Its temporary files go to a pytest
    folder (Chromium leaves its profile's lock folder in TMPDIR)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not (chromium and driver_path):
        reason = "needs chromium and chromedriver (apt-get install chromium chromium-driver; .ci/run installs them)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROME_FLAGS:  # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the console, for get_log("browser")
    env = {**os.environ, "TMPDIR": str(tmp_path_factory.mktemp("chromium"))}
    driver = webdriver.Chrome(service=Service(driver_path, env=env), options=options)
    driver.set_page_load_timeout(120)
    yield driver
    driver.quit()


def page_problems(driver, page: Path) -> tuple[list, list[str]]:
    """Open `page`; return its images as (src, complete, naturalWidth) and what is wrong with
    it: images that did not load, and console messages of level SEVERE (errors, failed loads)."""
    driver.get(page.as_uri())  # returns after the load event: every image has loaded or failed
    images = driver.execute_script(IMAGES_JS)
    problems = [f"{page.name}: image {src}... did not load" for src, complete, width in images
                if not (complete and width > 0)]
    problems += [f"{page.name}: console {e['level']}: {e['message']}" for e in driver.get_log("browser")
                 if e["level"] == "SEVERE"]
    return images, problems


@pytest.fixture(scope="module")
def report(tiny_report) -> Path:
    """The tiny study's report (rendered once per session, conftest)."""
    return tiny_report


def _figure_items(report: Path) -> list[dict]:
    sections = [json.loads(p.read_text()) for p in sorted((report.parent / "sections").glob("*.json"))]
    return [item for sec in sections for item in sec["items"] if item["kind"] == "figure"]


def test_the_checks_catch_a_broken_image_and_a_console_error(browser, tmp_path):
    page = tmp_path / "broken.html"
    page.write_text('<html><body><img src="data:image/png;base64,bm90IGEgcG5n"><img src="missing.png">'
                    '<script>console.error("boom")</script></body></html>')
    images, problems = page_problems(browser, page)
    assert len(images) == 2
    assert sum("did not load" in p for p in problems) == 2
    assert any("boom" in p for p in problems)
    assert any("missing.png" in p and "SEVERE" in p for p in problems)  # the failed load itself


def test_every_page_of_the_report_loads_its_images_and_logs_no_error(report, browser):
    figures = _figure_items(report)
    assert len(figures) >= 5  # loss, every domain, dynamics, radius, a waterfall at least
    images, problems = page_problems(browser, report)
    assert len(images) == len(figures)  # every figure of every section, shown once
    pages = sorted((report.parent / "notebooks").glob("*.html"))
    assert len(pages) >= 6
    for page in pages:
        problems += page_problems(browser, page)[1]
    assert problems == []


def test_report_tables_show_no_index_no_nan_and_integers_as_integers(report, browser):
    browser.get(report.as_uri())
    tables = browser.execute_script(TABLES_JS)
    assert len(tables) >= 4  # the runs, the seed summary and deltas, the gaps, the decomposition
    assert tables[0]["header"][0] == "label"  # the run overview starts with its labels, not an index
    for t in tables:
        assert t["row_headers"] == 0, t["header"]  # no index column
        rows = [r for r in t["rows"] if r]
        assert rows and all(len(r) == len(t["header"]) for r in rows), t
        for j, name in enumerate(t["header"]):
            column = [r[j] for r in rows]
            assert any(column), f"column {name!r} is empty: {t['header']}"
            assert not {"nan", "NaN", "None", "<NA>"} & set(column), (name, column)
            if name in INTEGER_COLUMNS:
                assert all(c.replace(",", "").lstrip("-").isdigit() for c in column if c), (name, column)


def test_every_figure_has_a_title_and_labelled_axes(report):
    for item in _figure_items(report):
        assert item["title"], f"{item['path']} has no title"
        assert item["unlabelled"] == [], f"{item['path']}: {item['unlabelled']}"

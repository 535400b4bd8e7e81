"""report.html as a person opens it: Chromium (Debian's package, driven by Selenium through Debian's
chromedriver) loads the page from its file with no network, logs no console error, sorts, filters the rows
as the filters say, and takes a screenshot."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from pipeline.cli import main
from pipeline.recipe import load_recipe
from pipeline.runs import run_dir_for

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")

pytestmark = pytest.mark.integration


@pytest.fixture
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("needs Chromium and its driver: apt-get install chromium chromium-driver (.ci/run does)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    flags = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,2000")
    for flag in flags:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def test_the_report_page_opens_offline_filters_its_rows_and_sorts(tiny_recipe, tmp_path, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    assert main(["run", str(tiny_recipe), "--runs-dir", str(tmp_path / "runs")]) == 0
    run_dir = run_dir_for(load_recipe(tiny_recipe), tmp_path / "runs")
    page = run_dir / "evaluate" / "report.html"
    text = page.read_text()
    # self-contained: nothing loaded from anywhere (the inlined chart library names URLs only in its code)
    assert not re.search(r"<(script|link|img)[^>]+(src|href)=", text)
    results = json.loads((run_dir / "evaluate" / "results.json").read_text())
    rows = results["eval_rows"]
    right = {name: c["metrics"]["exact_match"]["per_row"] for name, c in results["candidates"].items()}

    browser.get(page.as_uri())
    assert browser.find_element(By.TAG_NAME, "h1").text.startswith("tiny-test")

    def shown() -> int:
        visible = [tr for tr in browser.find_elements(By.CSS_SELECTOR, "#rows tbody tr") if tr.is_displayed()]
        assert int(browser.find_element(By.ID, "shown").text) == len(visible)
        return len(visible)

    assert shown() == rows
    show = Select(browser.find_element(By.ID, "show"))
    show.select_by_value("spec-wrong")
    assert shown() == sum(score < 1 for score in right["specialized"])
    show.select_by_value("spec-wrong-ref-right")
    both = zip(right["specialized"], right["reference"], strict=True)
    assert shown() == sum(s < 1 and r >= 1 for s, r in both)
    show.select_by_value("flipped")
    Select(browser.find_element(By.ID, "flip-a")).select_by_visible_text("base")
    Select(browser.find_element(By.ID, "flip-b")).select_by_visible_text("specialized")
    flipped = zip(right["base"], right["specialized"], strict=True)
    assert shown() == sum((b >= 1) != (s >= 1) for b, s in flipped)
    show.select_by_value("all")
    label = Select(browser.find_element(By.ID, "label"))
    label.select_by_visible_text("track_order")
    expected = [json.loads(line)["label"] for line in open(load_recipe(tiny_recipe).recipe.data.eval)]
    assert shown() == expected.count("track_order")
    label.select_by_value("")
    browser.find_element(By.ID, "search").send_keys("zzz-no-such-text")
    assert shown() == 0

    # the candidates table sorts by a column's numbers when its header is clicked
    header = browser.find_elements(By.CSS_SELECTOR, "#candidates th")[3]
    header.click()
    cells = browser.find_elements(By.CSS_SELECTOR, "#candidates tbody tr td:nth-child(4)")
    values = [float(c.get_attribute("data-sort")) for c in cells]
    assert values == sorted(values)

    # the charts drew: the costs, and the specialist's confusion matrix (10 labels: few enough to show)
    assert len(browser.find_elements(By.CSS_SELECTOR, ".js-plotly-plot")) == 2
    assert browser.find_element(By.ID, "confusion-matrix").is_displayed()
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert errors == []
    shot = tmp_path / "report.png"
    assert browser.save_screenshot(str(shot)) and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

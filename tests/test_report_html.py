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
from pipeline.stages.evaluate import read_generations

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
    page = run_dir / "report" / "report.html"
    text = page.read_text()
    # self-contained: nothing loaded from anywhere (the inlined chart library names URLs only in its code)
    assert not re.search(r"<(script|link|img)[^>]+(src|href)=", text)
    results = json.loads((run_dir / "evaluate" / "results.json").read_text())
    rows = results["eval_rows"]
    right = {name: c["metrics"]["exact_match"]["per_row"] for name, c in results["candidates"].items()}

    browser.get(page.as_uri())
    assert browser.find_element(By.TAG_NAME, "h1").text == "tiny-test: specialized vs base vs reference"

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
    # rows whose generation ran into max_new_tokens, for the candidate picked (the untrained base rambles)
    cut = {
        name: sum(
            g["stopped"] is False for g in read_generations(run_dir / "evaluate" / "generations" / f"{name}.jsonl")
        )
        for name in ("base", "specialized")
    }
    assert cut["base"] > 0
    show.select_by_value("cut")
    for name in ("base", "specialized"):
        Select(browser.find_element(By.ID, "who")).select_by_visible_text(name)
        assert shown() == cut[name]
    show.select_by_value("all")
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


def test_a_json_task_page_shows_answer_lengths_and_filters_answers_that_are_not_json(tiny_recipe, tmp_path, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    from pipeline.error_analysis import answer_analysis
    from pipeline.render import html
    from pipeline.render.markdown import verdict
    from pipeline.stages.report import build_report

    expected = [json.dumps({"intent": f"intent {i}", "slots": {"n": i}}) for i in range(6)]
    answers = {
        "base": ["Sure! The intent is", "I think", expected[2], "{", "{}", "The"],  # 4 not JSON ("{}" is an object)
        "specialized": [*expected[:4], '{"intent": "intent 4", "slo', "intent 5"],  # 2 not JSON, 1 of them cut off
    }
    cut_off = {"base": {0, 1, 5}, "specialized": {4}}
    generations = {
        name: [{"prediction": a, "generated_tokens": 8, "stopped": i not in cut_off[name]} for i, a in enumerate(texts)]
        for name, texts in answers.items()
    }
    per_row = {name: [float(a == e) for a, e in zip(texts, expected, strict=True)] for name, texts in answers.items()}
    costs = {"runtime": "transformers", "size_on_disk_bytes": 10**6, "peak_memory_bytes": 2 * 10**6,
             "seconds_per_example_p50": 0.01, "seconds_per_example_p95": 0.02, "generated_tokens_per_second": 100.0,
             "prompt_tokens_per_example": 9.0, "single_request_seconds_p50": 0.02}  # fmt: skip
    results = {
        "eval_rows": 6,
        "candidates": {
            name: {"role": name, "metrics": {"exact_match": {"value": sum(s) / 6, "per_row": s}}, **costs}
            for name, s in per_row.items()
        },
    }
    report = build_report(results, load_recipe(tiny_recipe))
    report["answers"] = {**answer_analysis(generations, expected, json_task=True), "max_new_tokens": 8}
    rows = [
        {"row": i, "source": f"test.jsonl:{i + 1}", "input": f"message {i}", "expected": e, "label": None,
         "answers": {n: answers[n][i] for n in answers}, "right": {n: per_row[n][i] >= 1 for n in answers}}
        for i, e in enumerate(expected)
    ]  # fmt: skip
    page = tmp_path / "report.html"
    page.write_text(html.render(report, verdict(report), rows))

    browser.get(page.as_uri())
    assert browser.find_element(By.ID, "answer-lengths").is_displayed()
    table = browser.find_element(By.ID, "answers").text
    assert "specialized 41 41 41 1.00 1 (16.7%) 0 2 (33.3%) 1" in table.replace("\n", " ")

    def shown() -> int:
        return sum(tr.is_displayed() for tr in browser.find_elements(By.CSS_SELECTOR, "#rows tbody tr"))

    show, who = Select(browser.find_element(By.ID, "show")), Select(browser.find_element(By.ID, "who"))
    assert not browser.find_element(By.ID, "who-pick").is_displayed()  # only with the filters that name a candidate
    show.select_by_value("not-json")
    assert browser.find_element(By.ID, "who-pick").is_displayed()
    assert shown() == 2  # the specialist, picked first
    who.select_by_visible_text("base")
    assert shown() == 4
    show.select_by_value("cut")
    assert shown() == 3
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert errors == []

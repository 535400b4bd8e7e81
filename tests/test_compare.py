"""`specialist compare`: two runs of the tiny task (LoRA rank 16 against 4) side by side: the recipe field that
differs, each candidate's metric, the specialists paired on the same rows, and the rows that changed."""

from __future__ import annotations

import json

import pytest

from pipeline import results
from pipeline.cli import main
from pipeline.recipe import load_recipe
from pipeline.runs import run_dir_for

pytestmark = pytest.mark.integration


def test_two_runs_of_one_task_side_by_side(tiny_recipe, write_recipe, intents_rows, tmp_path, capsys):
    runs = tmp_path / "runs"
    no_variants = "quantize: []\nevaluate: {gates: {quantized_max_drop: null}}\n"
    tiny_recipe = write_recipe(f"extends: {tiny_recipe.name}\n{no_variants}", "compared.yaml")
    assert main(["run", str(tiny_recipe), "--runs-dir", str(runs)]) == 0
    assert main(["run", str(tiny_recipe), "--runs-dir", str(runs), "--set", "lora.r=4"]) == 0
    first = run_dir_for(load_recipe(tiny_recipe), runs)
    second = run_dir_for(load_recipe(tiny_recipe, ["lora.r=4"]), runs)
    # a run made before a field existed: its resolved recipe lacks it, which is its default, not a difference
    resolved = first / "recipe.resolved.yaml"
    assert "  ignore_case: false\n" in resolved.read_text()
    resolved.write_text(resolved.read_text().replace("  ignore_case: false\n", ""))
    capsys.readouterr()
    assert main(["compare", str(first), str(second), "--runs-dir", str(runs)]) == 0
    shown = capsys.readouterr().out
    (folder,) = runs.glob("compare-*")
    found = json.loads((folder / "compare.json").read_text())
    assert found["recipe_differences"] == {"lora.r": [16, 4]}
    assert "| `lora.r` | `16` | `4` |" in shown
    rows = [
        json.loads((d / "evaluate" / "results.json").read_text())["candidates"]["specialized"]["metrics"]["exact_match"]
        for d in (first, second)
    ]
    a, b = rows[0]["per_row"], rows[1]["per_row"]
    (versus,) = found["versus_first"]
    assert versus["same_eval_rows"] and versus["wins"] == sum(y > x for x, y in zip(a, b, strict=True))
    assert versus["losses"] == sum(y < x for x, y in zip(a, b, strict=True))
    assert versus["changed_rows"] == versus["wins"] + versus["losses"]
    assert found["candidates"]["specialized"][1]["value"] == rows[1]["value"]
    assert found["candidates"]["reference"][0]["value"] == found["candidates"]["reference"][1]["value"]
    page = (folder / "compare.html").read_text()
    assert first.name in page and second.name in page and "<script" not in page
    # kept for the manual: the same findings, without this machine's run folder paths
    kept = json.loads(results.add(folder, "tiny-compare", tmp_path / "kept").read_text())
    assert kept["kind"] == "compare" and all("folder" not in run for run in kept["runs"])
    table = results.table(kept)
    assert "**Recipe differences**" in table and "| `lora.r` | `16` | `4` |" in table and "# Runs" not in table
    assert f"wrong where it was right on {versus['losses']}" in table

    # a run on some of the same eval rows: paired on the rows both evaluated, matched by content
    train, test = intents_rows
    lines = test.read_text().splitlines(keepends=True)
    shorter = tmp_path / "shorter.jsonl"
    shorter.write_text("".join(lines[5:17]))
    other = write_recipe(f"extends: {tiny_recipe.name}\ndata: {{eval: {shorter}}}\n", "other.yaml")
    assert main(["run", str(other), "--runs-dir", str(runs)]) == 0
    other_dir = run_dir_for(load_recipe(other), runs)
    assert main(["compare", str(first), str(other_dir), "--runs-dir", str(runs)]) == 0
    assert (
        f"paired on the 12 eval rows both runs evaluated; {len(lines) - 12} were evaluated only"
        in capsys.readouterr().out
    )

    # the eval file grows and one of its rows is edited after the runs (nightly retraining): each run is paired on
    # what it evaluated, not on today's file (which crashed with IndexError, or paired silently wrong)
    test.write_text("".join([lines[0].replace('"text": "', '"text": "edited '), *lines[1:], *lines[:7]]))
    assert main(["compare", str(first), str(second), "--runs-dir", str(runs)]) == 0
    again = json.loads((folder / "compare.json").read_text())["versus_first"][0]
    assert (again["paired_rows"], again["wins"], again["losses"]) == (len(lines), versus["wins"], versus["losses"])
    # a run from before runs kept their eval rows, on a file that has changed since: said, not guessed
    (second / "evaluate" / "eval_rows.jsonl").unlink()
    capsys.readouterr()
    assert main(["compare", str(first), str(second), "--runs-dir", str(runs)]) == 0
    assert "nothing pairs (one of the runs keeps no record of the rows it evaluated" in capsys.readouterr().out
    assert main(["compare", str(first)]) == 2  # one run is not a comparison

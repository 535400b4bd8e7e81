"""The manual cannot drift from the code: its generated pages equal what the code generates now, the results tables
equal what the kept runs render, the site builds with warnings as errors, and the README stays a front page."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

from pipeline import reference_docs, results
from pipeline.cli import _parser, main
from pipeline.errors import PipelineError
from pipeline.render import tables

ROOT = Path(__file__).resolve().parent.parent


def test_the_reference_pages_are_what_the_code_says():
    stale = reference_docs.write(ROOT / "docs" / "reference", _parser(), check=True)
    assert not stale, f"regenerate with `make docs-build` (specialist docs-reference): {stale}"


def test_every_recipe_field_and_verb_is_in_the_reference():
    from pipeline.recipe import Recipe

    page = reference_docs.recipe_page()
    for name, section in (("train", Recipe.model_fields["train"].annotation), ("data", None)):
        fields = (section or Recipe.model_fields[name].annotation).model_fields
        for field in fields:
            assert f"| `{name}.{field}` |" in page, field
    # the seven fields the old README documented nowhere
    for key in ("model.dtype", "train.max_steps", "train.warmup_ratio", "train.weight_decay", "train.save_steps",
                "quantize.keep_full_precision", "evaluate.bootstrap_samples"):  # fmt: skip
        assert f"| `{key}` |" in page, key
    cli = reference_docs.cli_page(_parser())
    for verb in ("run", "validate", "compare", "serve", "bench-train", "results", "docs-reference"):
        assert f"## `specialist {verb}`" in cli, verb
    assert "| 70 | the pipeline failed unexpectedly |" in reference_docs.exit_codes_page()
    folder = reference_docs.run_folder_page()
    assert "| `report_json` | `report/report.json` |" in folder and "| `adapter` | `train/adapter` |" in folder
    make = reference_docs.make_page(ROOT / "Makefile")
    for target in ("train", "test", "test-slow", "validate", "compare", "docs"):
        assert f"| `make {target}` |" in make, target
    assert "RECIPE=recipes/x.yaml" in make


def test_the_results_tables_are_what_the_kept_runs_render():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    stale = results.write(ROOT / "docs" / "results", ROOT / "docs" / "results.md", pages, check=True)
    assert not stale, f"regenerate with `specialist results`: {stale}"


def test_a_kept_result_renders_with_where_it_was_measured(tmp_path):
    result = {
        "recipe": "demo", "run_id": "abc123", "metric": "exact_match", "eval_rows": 200, "gates_passed": True,
        "gap_closed": 1.5, "commit": "1234567", "cpu": "AMD EPYC (family 25 model 17)", "cpu_count": 2,
        "date": "2026-12-07",
        "candidates": {
            "base": {"role": "base", "runtime": "transformers", "dtype": "float32", "size_on_disk_bytes": 542e6,
                     "shared_base_bytes": None, "peak_memory_bytes": 745e6, "single_request_seconds_p50": 0.88,
                     "seconds_per_example_p50": 0.11, "threads": 2, "value": 0.0, "ci95": [0.0, 0.0]},
            "gguf-q4_k_m": {"role": "quantized", "runtime": "llama.cpp", "dtype": "q4_k_m",
                            "size_on_disk_bytes": 106e6, "shared_base_bytes": None, "peak_memory_bytes": 153e6,
                            "single_request_seconds_p50": 0.156, "seconds_per_example_p50": None, "threads": 2,
                            "value": 0.93, "ci95": [0.895, 0.965]},
        },
    }  # fmt: skip
    table = results.table(result)
    assert (
        "| gguf-q4_k_m (quantized) | llama.cpp q4_k_m | **0.930 [0.895, 0.965]** | 106 MB | 153 MB | 0.156 s | — |"
        in (table)
    )
    assert (
        "| base (base) | transformers float32 | 0.000 [0.000, 0.000] | 542 MB | 745 MB | 0.880 s | 0.110 s |" in table
    )
    assert (
        "Run `abc123` of `demo` on 200 eval rows, at commit 1234567, 2026-12-07, on AMD EPYC (family 25 model 17)"
        in (table)
    )
    dirty = results.table({**result, "changed": True})  # measured with code the commit alone does not hold
    assert "at commit 1234567 with uncommitted changes to pipeline/, 2026-12-07" in dirty
    timed = results.table({**result, "wall_seconds": 1064.0})  # one invocation ran the whole run
    assert "gates passed; the whole run took 17 min 44 s." in timed and "gates passed." in table
    one = {"started_at": "2026-12-07T20:59:54+0000", "finished_at": "2026-12-07T21:17:38+0000", "stages_run": ["x"]}
    assert results._wall_seconds({"invocations": [one]}) == 1064.0
    assert results._wall_seconds({"invocations": [{**one, "stages_run": []}, one]}) is None  # resumed: no figure
    readme = tmp_path / "README.md"
    readme.write_text("before\n<!-- results:demo -->\nold table\n<!-- /results:demo -->\nafter\n")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "demo.json").write_text(__import__("json").dumps(result))
    page = tmp_path / "results.md"
    assert results.write(tmp_path / "results", page, [readme], check=True) == [page, readme]
    results.write(tmp_path / "results", page, [readme])
    assert readme.read_text() == f"before\n<!-- results:demo -->\n{table}\n<!-- /results:demo -->\nafter\n"
    assert results.write(tmp_path / "results", page, [readme], check=True) == []  # rendering again changes nothing
    with pytest.raises(PipelineError, match="has no cascade"):
        results.table(result, "cascade")
    result["cascade"] = {
        "validation_rows": 80, "fallback": "packaged:qwen", "reference_value": 0.8, "reference_ci95": [0.745, 0.85],
        "candidates": {"gguf-q4_k_m": {"threshold": 0.83, "value": 0.95, "ci95": [0.92, 0.98], "share_local": 0.86,
                                       "latency_seconds": {"mean": 0.2, "p50": 0.09, "p95": 1.1},
                                       "versus_reference": {"wins": 33, "losses": 3, "p_value": 1e-7}}},
    }  # fmt: skip
    cascade = results.table(result, "cascade")
    assert "| reference alone | 0.800 [0.745, 0.850] | 0% |" in cascade
    assert "| gguf-q4_k_m alone | 0.930 [0.895, 0.965] | 100% |" in cascade
    assert "| **gguf-q4_k_m + reference** | **0.950** [0.920, 0.980] | 86.0% | 33 / 3 (p = 1e-07) " in cascade
    assert "0.200 s / 0.090 s / 1.100 s | 0.830 |" in cascade and "chosen on 80 validation rows" in cascade
    readme.write_text("<!-- results:demo:cascade -->\n<!-- /results:demo:cascade -->\n")
    (tmp_path / "results" / "demo.json").write_text(__import__("json").dumps(result))
    results.write(tmp_path / "results", page, [readme])
    assert readme.read_text() == f"<!-- results:demo:cascade -->\n{cascade}\n<!-- /results:demo:cascade -->\n"
    assert "### demo: the cascade" in page.read_text()
    with pytest.raises(PipelineError, match="no adapter GGUF"):
        results.table(result, "shared")
    result["shared_base"] = {"gguf-lora-q8_0": {
        "base_type": "q8_0", "base_bytes": 144.8e6, "adapter_bytes": 9.8e6, "merged_variant": "gguf-q8_0",
        "answer_agreement_with_merged": 1.0,
        "specialists": [{"n": 1, "disk_merged_bytes": 145e6, "disk_shared_bytes": 155e6, "memory_merged_bytes": 203e6,
                         "memory_shared_bytes": 213e6},
                        {"n": 10, "disk_merged_bytes": 1448e6, "disk_shared_bytes": 243e6,
                         "memory_merged_bytes": None, "memory_shared_bytes": 301e6}]}}  # fmt: skip
    shared = results.table(result, "shared")
    assert "a 10 MB adapter on the q8_0 base (145 MB); the same answer as gguf-q8_0 on 100.0% of rows" in shared
    assert "| 10 | 1,448 MB | 243 MB | — | 301 MB |" in shared
    result["distillation"] = {
        "teacher": "packaged:qwen", "inputs": 400, "labelled_rows": 400, "dropped_rows": 0, "teacher_seconds": 281.2,
        "teacher_seconds_per_input": 0.703, "teacher_gold_agreement": 0.828, "kept_gold_agreement": None,
        "train_seconds": 97.0, "agreement_with_teacher": 0.785, "break_even_answers": 455.2,
        "break_even_answers_with_training": None,
    }  # fmt: skip
    distill = results.table(result, "distill")
    assert "| inputs labelled, kept, dropped | 400, 400, 0 |" in distill and "| 281 s (0.70 s an input) |" in distill
    assert "| teacher's answer = the gold answer (inputs that carry one) | 82.8% |" in distill
    assert "| answers after which the student paid back the labelling | 455 |" in distill
    assert "| ... and its training | — |" in distill
    result["candidates"]["base"].update(cpu_seconds_per_1000_answers=837.4, joules_per_1000_answers=None)
    cost = results.table(result, "cost")
    assert "| base | transformers float32 | 0.880 s | 837 | — (no energy counter) |" in cost
    assert "| gguf-q4_k_m | llama.cpp q4_k_m | 0.156 s | — | — (no energy counter) |" in cost


def test_a_kept_result_shows_confidences_and_json_fields():
    report = {
        "candidates": {
            "specialized": {"metrics": {"json_match": {"value": 0.7, "json_valid": 0.995, "exact_object": 0.52,
                                                       "per_field": {"intent": {"support": 200, "f1": 0.83},
                                                                     "slots.time": {"support": 31, "f1": 0.45}}}}},
        },
        "answers": {"json_task": True, "max_new_tokens": 64, "expected": {"chars": {"p50": 40, "p95": 80, "max": 99}},
                    "candidates": {"specialized": {
                        "chars": {"p50": 41, "p95": 82, "max": 300}, "median_length_ratio": 1.0,
                        "generated_tokens": {"p50": 14, "max": 64}, "cut_off": {"count": 1, "share": 0.005},
                        "empty_rows": 0,
                        "invalid_json": {"count": 1, "share": 0.005, "cut_off": 1,
                                         "examples": [{"row": 7, "cut_off": True, "answer": "a private text"}]}}}},
    }  # fmt: skip
    result = {
        "recipe": "slots", "run_id": "abc", "metric": "json_match", "eval_rows": 200, "gates_passed": None,
        "commit": None, "cpu": None, "cpu_count": 2, "date": None, "candidates": {},
        "json_fields": tables.json_fields(report, limit=12), "answers": results._answers(report["answers"]),
        "confidence": {"specialized": {"mean": 0.9, "mean_when_right": 0.93, "mean_when_wrong": 0.666},
                       "gguf-q4_k_m": {"mean": 0.89, "mean_when_right": 0.92, "mean_when_wrong": 0.7,
                                       "versus_specialized": {"same_answer": 0.985}}},
    }  # fmt: skip
    assert "| specialized | 0.900 | 0.930 | 0.666 | — |" in results.table(result, "confidence")
    assert "| gguf-q4_k_m | 0.890 | 0.920 | 0.700 | 98.5% |" in results.table(result, "confidence")
    shown = results.table(result, "json")
    assert "| whole object right | 0.520 |" in shown and "| `slots.time` (31) | 0.450 |" in shown
    assert "| specialized | 41 / 82 / 300 | 1.00 | 14 / 64 | 1 (0.5%) | 0 | 1 (0.5%; 1) |" in shown
    assert "a private text" not in json.dumps(result)  # the answers' text stays in the run's report
    with pytest.raises(PipelineError, match="has no next steps"):
        results.table(result, "next")
    result["next_steps"] = [{"kind": "train_longer", "advice": "train longer", "evidence": "validation 0.79 → 0.88"}]
    assert results.table(result, "next").startswith("- **Train longer.** Validation 0.79 → 0.88.\n")
    with pytest.raises(PipelineError, match="has no json_match fields"):
        results.table({**result, "json_fields": None}, "json")


def test_the_readme_is_a_front_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) <= 16_000, "README.md is the front page: move detail into docs/"
    for page in ("docs/getting-started/your-own-task.md", "docs/reference/recipe.md", "docs/development/layout.md"):
        assert f"]({page})" in readme and (ROOT / page).is_file(), page


def test_the_manual_builds_with_warnings_as_errors(tmp_path):
    if shutil.which("mkdocs", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("mkdocs is not installed: .venv/bin/pip install -e '.[docs]'")
    mkdocs = str(Path(sys.executable).parent / "mkdocs")
    built = subprocess.run(
        # not --quiet: mkdocs counts only the warnings it logs, so a quiet strict build passes with broken links
        [mkdocs, "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(tmp_path / "site")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert built.returncode == 0, built.stdout + built.stderr
    assert (tmp_path / "site" / "reference" / "recipe" / "index.html").is_file()


def test_docs_reference_check_fails_on_a_stale_page(tmp_path, capsys):
    assert main(["docs-reference", "--out", str(tmp_path)]) == 0
    (tmp_path / "cli.md").write_text("# an edit by hand\n")
    assert main(["docs-reference", "--out", str(tmp_path), "--check"]) == 2
    assert "stale reference pages" in capsys.readouterr().err


def test_the_house_map_names_every_module():
    listed, package = set(), ""
    for line in (ROOT / "docs" / "development" / "layout.md").read_text().splitlines():
        if found := re.match(r"^  (\w+)/\s", line):
            package = found.group(1) + "/"
        elif found := re.match(r"^(  |    )(\w+\.py)\s", line):
            listed.add((package if found.group(1) == "    " else "") + found.group(2))
    modules = {p.relative_to(ROOT / "pipeline").as_posix() for p in (ROOT / "pipeline").rglob("*.py")}
    # packages' __init__ and metrics/ (one evaluate module per metric, listed by name) are not lines of their own
    modules = {m for m in modules if not m.endswith("__init__.py") and not m.startswith("metrics/")}
    assert modules <= listed, f"docs/development/layout.md has no line for {sorted(modules - listed)}"


def test_no_import_circle_even_inside_functions_or_annotations():
    modules = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
               for p in (ROOT / "pipeline").rglob("*.py")}  # fmt: skip
    imports = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            imports[name].update(t for t in targets if t in modules and t != name)
    graph = TopologicalSorter(imports)
    try:
        graph.prepare()
    except CycleError as e:
        raise AssertionError(f"import circle: {' -> '.join(e.args[1])}") from None

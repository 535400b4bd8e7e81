"""The manual cannot drift from the code: its generated pages equal what the code generates now, the results tables
equal what the kept runs render, the site builds with warnings as errors, and the README stays a front page."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import reference_docs, results
from pipeline.cli import _parser, main

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
    readme = tmp_path / "README.md"
    readme.write_text("before\n<!-- results:demo -->\nold table\n<!-- /results:demo -->\nafter\n")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "demo.json").write_text(__import__("json").dumps(result))
    page = tmp_path / "results.md"
    assert results.write(tmp_path / "results", page, [readme], check=True) == [page, readme]
    results.write(tmp_path / "results", page, [readme])
    assert readme.read_text() == f"before\n<!-- results:demo -->\n{table}\n<!-- /results:demo -->\nafter\n"
    assert results.write(tmp_path / "results", page, [readme], check=True) == []  # rendering again changes nothing


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

"""Precision chosen by measurement: the probe at the model's shapes, the frozen base while training, and the
PyTorch candidates at evaluation."""

import json

import pytest
import torch
from transformers import AutoConfig

from pipeline import precision
from pipeline.cli import main
from pipeline.recipe import load_recipe

pytestmark = pytest.mark.integration

# what the probe measured: a CPU with bf16 units (AMX, AVX512-BF16), and one where bf16 is emulated
FAST_BF16 = {"float32": 200.0, "bfloat16": 880.0, "float16": 90.0}
SLOW_BF16 = {"float32": 150.0, "bfloat16": 16.0, "float16": 19.0}


@pytest.mark.parametrize(
    ("settings", "rates", "expected"),
    [
        ([], FAST_BF16, torch.bfloat16),  # auto where the probe timed bf16 faster
        ([], SLOW_BF16, torch.float32),  # auto where bf16 is emulated, far slower
        ([], {"float32": 200.0, "bfloat16": 230.0, "float16": None}, torch.float32),  # too small a gain to round for
        ([], {"float32": 100.0, "bfloat16": 150.0, "float16": 400.0}, torch.float16),
        (["lora.dora=true"], FAST_BF16, torch.float32),  # DoRA's weight norms read the base
        (["train.frozen_dtype=float32"], FAST_BF16, torch.float32),
        (["train.frozen_dtype=bfloat16"], SLOW_BF16, torch.bfloat16),
    ],
)
def test_frozen_dtype_auto_holds_the_base_in_the_precision_the_probe_timed_fastest(
    tiny_recipe, tiny_models, monkeypatch, settings, rates, expected
):
    monkeypatch.setattr(precision, "_time_products", lambda shapes, threads: rates)
    monkeypatch.setenv("SPECIALIST_CACHE", str(tiny_recipe.parent / "cache"))  # the figures above, not this CPU's
    config = AutoConfig.from_pretrained(tiny_models["base"])
    chosen = precision.frozen_precision(load_recipe(tiny_recipe, settings).recipe, torch.float32, config)
    assert getattr(torch, chosen["dtype"]) == expected
    if not settings:  # auto: the choice carries the figures it was made on
        assert chosen["probe"]["gflops"] == rates and chosen["probe"]["chosen"] == chosen["dtype"]
    else:
        assert chosen["probe"] is None


def test_the_probe_times_each_precision_at_the_model_shapes_once_per_machine(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setenv("SPECIALIST_CACHE", str(tmp_path))
    monkeypatch.setattr(precision, "SECONDS_PER_PRODUCT", 0.01)
    shapes = precision.layer_shapes(AutoConfig.from_pretrained(tiny_models["base"]))
    config = AutoConfig.from_pretrained(tiny_models["base"])
    assert shapes == [
        (config.hidden_size, config.hidden_size, 2),
        (config.hidden_size, config.num_key_value_heads * config.hidden_size // config.num_attention_heads, 2),
        (config.hidden_size, config.intermediate_size, 2),
        (config.intermediate_size, config.hidden_size, 1),
    ]
    first = precision.probe(shapes, threads=1)
    assert not first["cached"] and first["gflops"]["float32"] > 0
    assert first["chosen"] in precision.DTYPES and first["why"] and first["threads"] == 1
    assert precision.probe(shapes, threads=1) == {**first, "cached": True}  # measured once, read back after
    assert not precision.probe(shapes, threads=2)["cached"]  # another thread count is another measurement


def test_evaluate_dtype_auto_runs_the_pytorch_candidates_in_the_precision_the_probe_chose(
    tiny_recipe, monkeypatch, tmp_path
):
    monkeypatch.setattr(precision, "_time_products", lambda shapes, threads: FAST_BF16)
    monkeypatch.setenv("SPECIALIST_CACHE", str(tmp_path / "cache"))
    settings = ["evaluate.dtype=auto", "train.frozen_dtype=float32"]
    runs = tmp_path / "runs"
    assert main(["run", str(tiny_recipe), "--runs-dir", str(runs), *[x for s in settings for x in ("--set", s)]]) == 0
    run_dir = runs / "tiny-test" / load_recipe(tiny_recipe, settings).run_id
    candidates = json.loads((run_dir / "evaluate" / "results.json").read_text())["candidates"]
    pytorch = {name for name, c in candidates.items() if c["runtime"] == "transformers"}
    assert {"base", "specialized", "reference", "bnb-nf4"} <= pytorch  # the reference is a model folder
    assert all(candidates[name]["dtype"] == "bfloat16" for name in pytorch)
    assert json.loads((run_dir / "train" / "result.json").read_text())["frozen_dtype"] == "float32"
    assert "| specialized | specialized | transformers bfloat16 |" in (run_dir / "report" / "report.md").read_text()

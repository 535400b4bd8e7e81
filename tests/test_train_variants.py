"""The train stage's loss shortcut, adapter variants (DoRA, rsLoRA, modules_to_save), and bench-train."""

import json

import pytest
import torch
from peft import get_peft_model

from pipeline import data, models
from pipeline.bench import run_train
from pipeline.cli import main
from pipeline.recipe import DataSection, LoraSection, load_recipe
from pipeline.stages.train import AnswerLossTrainer, frozen_dtype, hold_frozen_base, lora_config

pytestmark = pytest.mark.integration


class _Args:
    average_tokens_across_devices = False


class _FakeTrainer:
    args = _Args()
    keeps_logits = True


@pytest.mark.parametrize("left", [False, True], ids=["right-padded", "left-padded"])
def test_logits_only_where_labels_are_give_the_models_own_loss_and_gradients(tiny_models, intents_rows, left):
    source = models.ModelSource(str(tiny_models["base"]), None, True)
    tokenizer = models.load_tokenizer(source)
    train, _ = intents_rows
    section = DataSection(train=str(train), eval=str(train), prompt="M: {text}\nI:", target=" {label}")
    rows = data.load_splits(section).train[:12]
    examples = data.training_examples(tokenizer, rows, False, section).examples
    right = data.pad_batch(examples, tokenizer.pad_token_id)  # the reference: the model's own loss, right-padded
    batch = data.pad_batch(examples, tokenizer.pad_token_id, left=left)
    torch.manual_seed(0)
    model = get_peft_model(models.load_model(source, torch.float32), lora_config(LoraSection(r=4)))
    for name, param in model.named_parameters():  # LoRA B starts at zero; give the adapter an effect
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    reference = model(**right).loss
    reference.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    ours = AnswerLossTrainer.compute_loss(_FakeTrainer(), model, dict(batch))
    ours.backward()
    assert torch.allclose(ours, reference, atol=1e-6)
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert torch.allclose(param.grad, expected[name], atol=1e-5), name
    if left:  # the answers share the last columns: few logits
        columns = (batch["labels"][:, 1:] != data.IGNORE_INDEX).any(dim=0).sum()
        assert columns < batch["labels"].shape[1] / 2
    every_position = _FakeTrainer()
    every_position.keeps_logits = False  # an architecture without logits_to_keep: the same loss, all logits
    assert torch.allclose(AnswerLossTrainer.compute_loss(every_position, model, dict(batch)), reference, atol=1e-6)
    items = (batch["labels"][:, 1:] != data.IGNORE_INDEX).sum()
    summed = AnswerLossTrainer.compute_loss(_FakeTrainer(), model, dict(batch), num_items_in_batch=items * 2)
    assert torch.allclose(summed, reference / 2, atol=1e-6)  # normalized over an accumulated batch twice as big


@pytest.mark.parametrize(
    ("setting", "config_key", "value"),
    [
        ("lora.dora=true", "use_dora", True),
        ("lora.rslora=true", "use_rslora", True),
        ("lora.modules_to_save=[lm_head]", "modules_to_save", ["lm_head"]),
    ],
)
def test_adapter_variants_train_merge_and_export(tiny_recipe, tmp_path, capsys, setting, config_key, value):
    runs = tmp_path / "runs"
    overrides = [setting, "quantize=[{kind: gguf, type: q8_0}]", "train.epochs=1"]
    args = ["run", str(tiny_recipe), "--runs-dir", str(runs)]
    assert main([*args, *(a for o in overrides for a in ("--set", o))]) == 0
    run_dir = runs / "tiny-test" / load_recipe(tiny_recipe, overrides).run_id
    config = json.loads((run_dir / "train" / "adapter" / "adapter_config.json").read_text())
    assert config[config_key] == value
    quantized = json.loads((run_dir / "quantize" / "result.json").read_text())["variants"]
    assert quantized["merged"]["fidelity"]["merge"]["top1_agreement"] >= 0.99  # merged as trained
    report = json.loads((run_dir / "evaluate" / "report.json").read_text())
    assert {"specialized", "gguf-q8_0"} <= set(report["candidates"])


def test_modules_to_save_must_name_a_module(tiny_recipe, capsys):
    assert main(["validate", str(tiny_recipe), "--set", "lora.modules_to_save=[classifier]"]) == 2
    assert "'classifier' names no module of the base; modules near the top:" in capsys.readouterr().err


def test_bench_train_runs_both_ways_on_the_same_rows(tiny_recipe, capsys):
    result = run_train(tiny_recipe, ["train.epochs=1"], rows=64)
    stage, loop = result["train stage"], result["plain loop"]
    assert stage["rows"] == loop["rows"] == 64 and stage["tokens"] == loop["tokens"]
    assert stage["steps"] == loop["steps"] == 4  # 64 rows, batch 16
    assert all(way["final_loss"] < way["first_loss"] for way in (stage, loop))
    assert result["ratio"] == pytest.approx(stage["tokens_per_second"] / loop["tokens_per_second"])
    out = capsys.readouterr().out
    assert "train stage / plain loop, real tokens/s:" in out
    assert f"frozen base weights: train stage {stage['frozen_dtype']}, plain loop float32" in out


def test_a_frozen_base_held_in_bf16_keeps_the_adapter_and_activations_in_fp32(tiny_models):
    source = models.ModelSource(str(tiny_models["base"]), None, True)
    torch.manual_seed(0)
    model = get_peft_model(models.load_model(source, torch.float32), lora_config(LoraSection(r=4)))
    ids = torch.randint(0, 100, (2, 12))
    before = model(input_ids=ids).logits
    held = hold_frozen_base(model, torch.bfloat16, torch.float32)
    assert held == sum(1 for n, _ in model.named_modules() if n.endswith(".base_layer"))
    after = model(input_ids=ids, labels=ids)
    assert after.logits.dtype == torch.float32
    assert not torch.equal(after.logits, before)  # the frozen products are rounded ...
    assert (after.logits - before).norm() / before.norm() < 0.02  # ... to bf16's precision, no more
    after.loss.backward()
    adapter = [p for n, p in model.named_parameters() if "lora_" in n]
    assert adapter and all(p.dtype == torch.float32 and p.grad is not None for p in adapter)
    frozen = [p for n, p in model.named_parameters() if n.endswith("base_layer.weight")]
    assert frozen and all(p.dtype == torch.bfloat16 and p.grad is None for p in frozen)


@pytest.mark.parametrize(
    ("settings", "amx", "expected"),
    [
        ([], True, torch.bfloat16),  # auto on a CPU with bf16 matrix units
        ([], False, torch.float32),  # auto without them: bf16 would be emulated, far slower
        (["lora.dora=true"], True, torch.float32),  # DoRA's weight norms read the base
        (["train.frozen_dtype=float32"], True, torch.float32),
        (["train.frozen_dtype=bfloat16"], False, torch.bfloat16),
    ],
)
def test_frozen_dtype_auto_holds_the_base_in_bf16_only_where_that_is_faster(
    tiny_recipe, monkeypatch, settings, amx, expected
):
    monkeypatch.setattr(models, "cpu_has_bf16_units", lambda: amx)
    assert frozen_dtype(load_recipe(tiny_recipe, settings).recipe, torch.float32) == expected


def test_frozen_dtype_is_refused_where_the_base_is_not_plain(tiny_recipe, capsys):
    assert main(["validate", str(tiny_recipe), "--set", "train.frozen_dtype=bfloat16", "--set", "lora.dora=true"]) == 2
    assert "train.frozen_dtype: bfloat16 applies to plain LoRA; DoRA computes" in capsys.readouterr().err


def test_training_on_a_bf16_frozen_base_follows_the_fp32_loss_curve(tiny_recipe, tmp_path):
    losses = {}
    for setting in ("float32", "bfloat16"):
        runs = tmp_path / setting
        overrides = [f"train.frozen_dtype={setting}"]
        assert main(["train", str(tiny_recipe), "--runs-dir", str(runs), "--set", overrides[0]]) == 0
        train_dir = runs / "tiny-test" / load_recipe(tiny_recipe, overrides).run_id / "train"
        assert json.loads((train_dir / "result.json").read_text())["frozen_dtype"] == setting
        losses[setting] = [json.loads(line)["loss"] for line in (train_dir / "metrics.jsonl").open()]
    assert len(losses["float32"]) == len(losses["bfloat16"]) == 12
    assert losses["bfloat16"] != losses["float32"]
    assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=0.05)

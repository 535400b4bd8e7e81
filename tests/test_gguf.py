"""GGUF export with llama.cpp's tools, evaluation through llama.cpp, and the fidelity checks, on tiny models.

llama.cpp (llama-cpp-python) is built once per machine into $SPECIALIST_CACHE and reused; the first
test session on a new machine pays the build (about 3 minutes on 2 cores).
"""

import json
import math
import os
import shutil
from pathlib import Path

import jinja2
import pytest
import torch

from pipeline import gguf_export, llamacpp_install
from pipeline.cli import main
from pipeline.data import read_jsonl
from pipeline.errors import PipelineError
from pipeline.fidelity import token_parity
from pipeline.files import cache_root
from pipeline.models import ModelSource, load_tokenizer
from pipeline.recipe import load_recipe
from pipeline.runtimes import Prompt

pytestmark = pytest.mark.integration

GGUF_VARIANTS = (
    "quantize=[{kind: gguf, type: f16}, {kind: gguf, type: q8_0}, {kind: gguf, type: q4_0}, "
    "{kind: gguf-lora, base_type: q8_0}]"
)


@pytest.fixture(scope="module")
def gguf_run(tiny_models, tmp_path_factory):
    """The tiny recipe trained once, exported to three GGUF types and evaluated through llama.cpp."""
    llamacpp_install.ensure()
    folder = tmp_path_factory.mktemp("gguf")
    recipe = folder / "recipe.yaml"
    recipe.write_text(
        "name: gguf-test\n"
        f"model: {{base: {tiny_models['base']}}}\n"
        "data:\n"
        f"  train: {folder / 'train.jsonl'}\n"
        f"  eval: {folder / 'test.jsonl'}\n"
        '  prompt: "Message: {text}\\nIntent:"\n'
        '  target: " {label}"\n'
        "  chat_template: never\n"
        "train: {epochs: 10, batch_size: 16, lr: 5.0e-3}\n"
        "evaluate: {max_new_tokens: 6, batch_size: 8, bootstrap_samples: 200, latency_rows: 4}\n"
    )
    from tests.conftest import INTENTS

    for name, count in (("train.jsonl", 160), ("test.jsonl", 24)):
        source = INTENTS / ("train.jsonl" if name == "train.jsonl" else "test.jsonl")
        rows = [row for _, row in read_jsonl(source)][:count]
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs = folder / "runs"
    assert main(["run", str(recipe), "--runs-dir", str(runs), "--set", GGUF_VARIANTS]) == 0
    loaded = load_recipe(recipe, [GGUF_VARIANTS])
    return loaded, runs / "gguf-test" / loaded.run_id


def _predictions(run_dir, name):
    lines = (run_dir / "evaluate" / "generations" / f"{name}.jsonl").read_text().splitlines()[1:]
    return {e["row"]: e for e in map(json.loads, lines)}


def test_each_gguf_type_is_written_by_llamacpp_with_its_tensor_types(gguf_run):
    _, run_dir = gguf_run
    result = json.loads((run_dir / "quantize" / "result.json").read_text())["variants"]
    for label, main_type in (("gguf-f16", "F16"), ("gguf-q8_0", "Q8_0"), ("gguf-q4_0", "Q4_0")):
        folder = run_dir / "quantize" / label
        assert {"model.gguf", "Modelfile", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
        assert (folder / "model.gguf").read_bytes()[:4] == b"GGUF"
        types = result[label]["tensor_types"]
        assert types == gguf_export.tensor_types(folder / "model.gguf")
        assert max(types, key=types.get) == main_type  # the linear weights; norms stay F32
        assert result[label]["size_on_disk_bytes"] == (folder / "model.gguf").stat().st_size
    sizes = [result[label]["size_on_disk_bytes"] for label in ("gguf-f16", "gguf-q8_0", "gguf-q4_0")]
    assert sizes == sorted(sizes, reverse=True)
    # intermediates (the converter's view of the merged model, the f16 file quantizing starts from) are gone
    assert sorted(p.name for p in (run_dir / "quantize").iterdir() if p.name.startswith(".gguf")) == []


def test_f16_file_answers_exactly_like_the_specialist_and_lower_types_drift(gguf_run):
    _, run_dir = gguf_run
    report = json.loads((run_dir / "report" / "report.json").read_text())
    fidelity = report["fidelity"]
    assert fidelity["merge"]["top1_agreement"] == 1.0 and fidelity["merge"]["max_abs_logit_diff"] < 1e-3
    # f16 weights and llama.cpp's f16 flash attention flip a few near-ties of this barely trained model's prompt
    # positions; on the answers the specialist was trained on, they agree
    assert fidelity["gguf-f16"]["export"]["top1_agreement"] >= 0.97
    assert fidelity["gguf-f16"]["export"]["answer_top1_agreement"] >= 0.97
    assert 24 <= fidelity["gguf-f16"]["export"]["answer_positions"] < fidelity["gguf-f16"]["export"]["positions"]
    assert fidelity["gguf-q4_0"]["export"]["top1_agreement"] < fidelity["gguf-f16"]["export"]["top1_agreement"]
    assert abs(fidelity["gguf-f16"]["export"]["nll"] - fidelity["gguf-f16"]["export"]["nll_merged"]) < 0.01
    specialized, f16 = _predictions(run_dir, "specialized"), _predictions(run_dir, "gguf-f16")
    same = sum(f16[i]["prediction"] == specialized[i]["prediction"] for i in f16)
    assert same >= 23, [(specialized[i]["prediction"], f16[i]["prediction"]) for i in f16]  # of 24
    candidate = report["candidates"]["gguf-f16"]
    assert candidate["runtime"] == "llama.cpp" and candidate["role"] == "quantized"
    assert report["comparisons"]["gguf-f16"]["wins"] == report["comparisons"]["gguf-f16"]["losses"] == 0


def test_an_adapter_gguf_on_the_shared_base_answers_like_the_merged_file_of_its_type(gguf_run):
    loaded, run_dir = gguf_run
    folder = run_dir / "quantize" / "gguf-lora-q8_0"
    variants = json.loads((run_dir / "quantize" / "result.json").read_text())["variants"]
    lora, merged = variants["gguf-lora-q8_0"], variants["gguf-q8_0"]
    assert {"adapter.gguf", "base.json", "Modelfile", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    assert (folder / "adapter.gguf").read_bytes()[:4] == b"GGUF"
    # the adapter alone: LoRA's A and B matrices in f16 (2 bytes a parameter) and a header; the base is in the cache
    from safetensors import safe_open

    with safe_open(run_dir / "train" / "adapter" / "adapter_model.safetensors", "pt") as trained:
        parameters = sum(math.prod(trained.get_slice(k).get_shape()) for k in trained.keys())
    size = (folder / "adapter.gguf").stat().st_size
    assert lora["size_on_disk_bytes"] == size and 2 * parameters < size < 2 * parameters + 32_000
    base = Path(json.loads((folder / "base.json").read_text())["file"])
    assert base.is_file() and cache_root() in base.parents and base.parent.parent.name == "gguf-bases"
    assert lora["shared_base_bytes"] == base.stat().st_size
    # the same tensors of the same type as the merged q8_0 file: its size but for metadata (the chat template)
    assert abs(base.stat().st_size - merged["size_on_disk_bytes"]) < 0.01 * merged["size_on_disk_bytes"]
    assert set(lora["tensor_types"]) == {"F16"} and lora["base_tensor_types"] == merged["tensor_types"]
    modelfile = (folder / "Modelfile").read_text()
    assert f"FROM {base}\n" in modelfile and "ADAPTER ./adapter.gguf\n" in modelfile
    # the same model two ways: llama.cpp applying the adapter to the q8_0 base, and the merge written as q8_0
    twin = lora["fidelity"]["versus_merged_gguf"]
    assert twin["variant"] == "gguf-q8_0" and twin["answer_top1_agreement"] >= 0.95 and twin["top1_agreement"] >= 0.9
    assert lora["fidelity"]["token_parity"]["identical"] == 24 and lora["fidelity"]["end_token"]["same"]
    mine, theirs = _predictions(run_dir, "gguf-lora-q8_0"), _predictions(run_dir, "gguf-q8_0")
    assert sum(mine[i]["prediction"] == theirs[i]["prediction"] for i in mine) >= 22  # of 24
    report = json.loads((run_dir / "report" / "report.json").read_text())
    candidate = report["candidates"]["gguf-lora-q8_0"]
    assert candidate["runtime"] == "llama.cpp" and candidate["size_on_disk_bytes"] == lora["size_on_disk_bytes"]
    assert candidate["weights_memory_bytes"] == lora["size_on_disk_bytes"] + lora["shared_base_bytes"]
    shared = report["shared_base"]["gguf-lora-q8_0"]
    assert shared["merged_variant"] == "gguf-q8_0" and shared["merged_bytes_measured"]
    ten = shared["specialists"][-1]
    assert ten["n"] == 10 and ten["disk_merged_bytes"] == 10 * merged["size_on_disk_bytes"]
    assert ten["disk_shared_bytes"] == lora["shared_base_bytes"] + 10 * lora["size_on_disk_bytes"]
    assert ten["disk_shared_bytes"] < ten["disk_merged_bytes"]  # (a tiny model: its r=16 adapter is half its size)
    peak = report["candidates"]["gguf-q8_0"]["peak_memory_bytes"]
    assert ten["memory_merged_bytes"] == 10 * peak
    assert ten["memory_shared_bytes"] == candidate["peak_memory_bytes"] + 9 * lora["size_on_disk_bytes"]
    markdown = (run_dir / "report" / "report.md").read_text()
    assert "## One base, many specialists" in markdown and "f16 adapter on a q8_0 base" in markdown
    assert "against gguf-q8_0 (the merge written as one file of the same type)" in markdown


def test_the_shared_base_gguf_is_converted_once_per_base_and_type(gguf_run):
    from pipeline.stages.quantize import shared_base_gguf

    loaded, run_dir = gguf_run
    base = Path(json.loads((run_dir / "quantize" / "gguf-lora-q8_0" / "base.json").read_text())["file"])
    written = base.stat().st_mtime_ns
    converter = llamacpp_install.ensure()
    assert shared_base_gguf(loaded.recipe, "q8_0", converter, 2) == base  # another run on this base: no conversion
    assert base.stat().st_mtime_ns == written
    assert json.loads((base.parent / "base.json").read_text())["type"] == "q8_0"


def test_both_runtimes_give_each_answer_the_same_confidence(gguf_run):
    """The probability of the answer, computed by llama.cpp from its logits and by transformers from its scores,
    agrees on the f16 file (near-exact) and drifts only a little at q8_0; the report states the agreement."""
    _, run_dir = gguf_run
    report = json.loads((run_dir / "report" / "report.json").read_text())
    specialized = _predictions(run_dir, "specialized")
    for label, tolerance in (("gguf-f16", 0.02), ("gguf-q8_0", 0.08)):  # q8_0: its batched kernels' rounding too
        variant = _predictions(run_dir, label)
        same = [i for i in variant if variant[i]["prediction"] == specialized[i]["prediction"]]
        assert len(same) >= 20
        differences = [abs(variant[i]["confidence"] - specialized[i]["confidence"]) for i in same]
        assert max(differences) < tolerance, (label, sorted(differences)[-3:])
        assert all(0 < variant[i]["confidence"] <= 1 for i in variant)
        facts = report["confidence"][label]["versus_specialized"]
        assert facts["same_answer"] == len(same) / len(variant) and facts["p95_abs_difference"] <= max(differences)
    assert "## Confidence" in (run_dir / "report" / "report.md").read_text()
    assert "confidence" not in _predictions(run_dir, "base")[0]  # only the specialist and its variants defer


def test_llamacpp_tokenizes_the_prompts_as_training_did_and_stops_at_the_trained_end_token(gguf_run):
    _, run_dir = gguf_run
    report = json.loads((run_dir / "report" / "report.json").read_text())
    for label in ("gguf-f16", "gguf-q8_0", "gguf-q4_0"):
        check = report["fidelity"][label]
        assert check["token_parity"]["identical"] == check["token_parity"]["prompts"] == 24
        assert check["end_token"]["same"]
    specialized = _predictions(run_dir, "specialized")
    f16 = _predictions(run_dir, "gguf-f16")
    # llama.cpp ends an answer at the trained end token ("stop", not the length limit) where the specialist does
    assert [f16[i]["stopped"] for i in f16] == [specialized[i]["stopped"] for i in f16]
    assert sum(e["stopped"] for e in f16.values()) >= 18
    stops = report["candidates"]["gguf-f16"]["stopped_at_end_token"]
    assert (
        stops
        == report["candidates"]["specialized"]["stopped_at_end_token"]
        > report["candidates"]["base"]["stopped_at_end_token"]
    )


def test_every_candidate_has_single_request_latency(gguf_run):
    _, run_dir = gguf_run
    report = json.loads((run_dir / "report" / "report.json").read_text())
    for name, candidate in report["candidates"].items():
        assert candidate["single_request_rows"] == 4, name
        assert 0 < candidate["single_request_seconds_p50"] <= candidate["single_request_seconds_p95"], name
    markdown = (run_dir / "report" / "report.md").read_text()
    assert "single request p50" in markdown and "## Fidelity" in markdown
    assert "| gguf-q4_0 | q4_0 |" in markdown


def test_gguf_and_modelfile_carry_the_prompt_the_specialist_was_trained_on(gguf_run):
    loaded, run_dir = gguf_run
    folder = run_dir / "quantize" / "gguf-q4_0"
    text = "where is my parcel?"
    trained_prompt = loaded.recipe.data.prompt.format(text=text)
    meta = gguf_export.metadata(folder / "model.gguf", ("tokenizer.chat_template",))
    chat_template = jinja2.Template(meta["tokenizer.chat_template"])
    assert chat_template.render(messages=[{"role": "user", "content": text}]) == trained_prompt
    modelfile = (folder / "Modelfile").read_text()
    assert modelfile.count("FROM ./model.gguf") == 1 and "PARAMETER temperature 0" in modelfile
    template = modelfile.split('TEMPLATE """')[1].split('"""')[0]
    assert template.replace("{{ .Prompt }}", text) == trained_prompt
    tokenizer = load_tokenizer(ModelSource(str(folder), None, True))
    assert f"PARAMETER stop {json.dumps(tokenizer.eos_token)}" in modelfile


def test_killed_llamacpp_evaluation_continues_from_its_cache(gguf_run, capsys):
    loaded, run_dir = gguf_run
    cache = run_dir / "evaluate" / "generations" / "gguf-q8_0.jsonl"
    complete = cache.read_text().splitlines()
    cache.write_text("\n".join(complete[:6]) + "\n" + complete[6][:7])  # header, 5 answers, half a line
    (run_dir / "evaluate" / "generations" / "gguf-q8_0.cost.json").unlink()
    recipe = loaded.path
    assert main(["eval", str(recipe), "--runs-dir", str(run_dir.parent.parent), "--set", GGUF_VARIANTS]) == 0
    assert "[evaluate] gguf-q8_0: generating 19 answers (5 cached)" in capsys.readouterr().err
    assert cache.read_text().splitlines()[:6] == complete[:6] and len(cache.read_text().splitlines()) == 25


def test_a_merge_that_changes_answers_is_an_error(gguf_run, capsys, monkeypatch):
    from peft.tuners.tuners_utils import BaseTuner

    loaded, run_dir = gguf_run
    original = BaseTuner.merge_and_unload

    def broken_merge(self, *args, **kwargs):
        model = original(self, *args, **kwargs)
        with torch.no_grad():
            for layer in model.model.layers:
                layer.mlp.down_proj.weight.mul_(-3.0)
        return model

    monkeypatch.setattr(BaseTuner, "merge_and_unload", broken_merge)
    assert main(["quantize", str(loaded.path), "--runs-dir", str(run_dir.parent.parent), "--set", GGUF_VARIANTS]) == 2
    err = capsys.readouterr().err
    assert "the merge changed the model, so nothing was exported" in err and "Traceback" not in err


def test_token_parity_names_the_first_prompt_llamacpp_reads_differently(tiny_models):
    tokenizer = load_tokenizer(ModelSource(str(tiny_models["base"]), None, True))
    prompts = [Prompt(tokenizer(t)["input_ids"], t, True) for t in ("Message: hi", "Message: refund")]
    parity = token_parity(prompts, [prompts[0].ids, prompts[1].ids[:-1]], tokenizer)
    assert parity["identical"] == 1 and parity["mismatched_rows"] == [1]
    assert parity["first_mismatch"]["text"] == "Message: refund"
    assert len(parity["first_mismatch"]["llama_cpp"]) == len(parity["first_mismatch"]["expected"]) - 1


def test_plain_prompt_parts_split_around_the_one_field():
    assert gguf_export.plain_prompt_parts("Classify.\nMessage: {text}\nIntent:") == (
        "Classify.\nMessage: ",
        "\nIntent:",
    )
    assert gguf_export.plain_prompt_parts("Literal {{braces}}: {text}") == ("Literal {braces}: ", "")
    assert gguf_export.plain_prompt_parts("{title}: {body}") is None  # the client sends the whole prompt
    assert gguf_export.plain_chat_template(None) == "{{ messages[-1]['content'] }}"


def test_ollama_template_of_a_chat_specialist_reproduces_its_chat_template(tiny_models):
    tokenizer = load_tokenizer(ModelSource(str(tiny_models["base"]), None, True))
    tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<eos>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    template = gguf_export.ollama_template(tokenizer, chat=True, parts=None)
    with_system, without_system = (
        template.removeprefix("{{ if .System }}").removesuffix("{{ end }}").split("{{ else }}")
    )
    user = [{"role": "user", "content": "P"}]
    system = [{"role": "system", "content": "S"}]
    render = tokenizer.apply_chat_template
    assert without_system.replace("{{ .Prompt }}", "P") == render(user, add_generation_prompt=True, tokenize=False)
    filled = with_system.replace("{{ .System }}", "S").replace("{{ .Prompt }}", "P")
    assert filled == render(system + user, add_generation_prompt=True, tokenize=False)


def test_build_flags_are_portable_unless_the_user_sets_cmake_args(monkeypatch):
    monkeypatch.delenv("CMAKE_ARGS", raising=False)
    default = llamacpp_install.cmake_args()
    assert "-DGGML_NATIVE=OFF" in default
    default_dir = llamacpp_install.install_dir()
    monkeypatch.setenv("CMAKE_ARGS", "-DGGML_CUDA=on")
    assert llamacpp_install.cmake_args()[-1] == "-DGGML_CUDA=on"
    assert llamacpp_install.install_dir() != default_dir  # another build, cached beside the first


def test_an_unknown_pre_tokenizer_is_an_error_naming_llamacpp(tiny_models, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_models["base"], model)
    tokenizer = json.loads((model / "tokenizer.json").read_text())
    tokenizer["pre_tokenizer"] = {"type": "Whitespace"}
    (model / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(PipelineError, match="does not know this tokenizer's pre-tokenizer"):
        gguf_export.convert(llamacpp_install.ensure(), model, tmp_path / "x.gguf", "f16", tmp_path / "convert.log")


def test_a_chat_client_gets_the_specialists_answer_from_the_user_text_alone(gguf_run):
    """llama.cpp's chat API (as llama-server's /v1/chat/completions uses it) wraps the user's message in the
    template embedded in the file, which is the plain prompt the specialist was trained on."""
    from pipeline.runtimes.llamacpp import call_in_child

    loaded, run_dir = gguf_run
    rows = [row for _, row in read_jsonl(Path(loaded.recipe.data.eval))][:6]
    answers = call_in_child(
        _chat_answers, str(run_dir / "quantize" / "gguf-f16" / "model.gguf"), [r["text"] for r in rows]
    )
    evaluated = _predictions(run_dir, "gguf-f16")
    # the chat API drops an invalid UTF-8 byte where evaluation shows U+FFFD (the tiny models emit some)
    assert answers == [evaluated[i]["prediction"].replace("\ufffd", "") for i in range(6)]


def _chat_answers(gguf_file: str, texts: list[str]) -> list[str]:
    import llama_cpp

    llm = llama_cpp.Llama(gguf_file, n_ctx=256, n_threads=2, verbose=False)
    replies = [
        llm.create_chat_completion([{"role": "user", "content": t}], temperature=0.0, top_k=1, max_tokens=6)
        for t in texts
    ]
    return [r["choices"][0]["message"]["content"].strip() for r in replies]


def _abort_reading(gguf_file: str) -> None:
    os.abort()  # what llama.cpp does on a file it cannot use (a GGML_ASSERT in its loader)


def test_a_llamacpp_child_that_aborts_is_an_error_naming_the_file_not_a_wait():
    from pipeline.runtimes.llamacpp import call_in_child

    with pytest.raises(PipelineError, match=r"llama.cpp died reading /x/model.gguf"):
        call_in_child(_abort_reading, "/x/model.gguf")


def _answers_both_ways(gguf_file: str, prompts: list[dict]) -> tuple[list[str], list[str]]:
    """In a llama.cpp child: each prompt answered from a clean KV cache, then keeping the shared prefix's."""
    from pipeline.runtimes import llamacpp

    llm = llamacpp.open_model(gguf_file, 512, 2, False)
    ids = [llamacpp.tokenize(llm, Prompt(**p)) for p in prompts]
    fresh = [llamacpp.complete(llm, i, 6)["prediction"] for i in ids]
    kept = [llamacpp.complete(llm, i, 6, reuse_prefix=True)["prediction"] for i in ids]
    return fresh, kept


def _answers_together(gguf_file: str, prompts: list[dict], lora_file: str | None) -> tuple[list[dict], list[dict]]:
    """In a llama.cpp child: each prompt alone from a clean cache, then the prompts decoded together in batches."""
    from pipeline.runtimes import llamacpp

    llm = llamacpp.open_model(gguf_file, 512, 2, False, lora_file=lora_file)
    ids = [llamacpp.tokenize(llm, Prompt(**p)) for p in prompts]
    alone = [llamacpp.complete(llm, i, 6, confidence=True) for i in ids]
    together = llamacpp.Sequences(llm, 8, max(map(len, ids)) + 14, 2)
    batched = [a for start in range(0, len(ids), 8) for a in together.answer(ids[start : start + 8], 6, True)]
    return alone, batched


@pytest.mark.parametrize("variant", ["gguf-f16", "gguf-lora-q8_0"])
def test_prompts_decoded_together_get_the_answers_each_gets_alone(gguf_run, variant):
    from pipeline.runtimes import llamacpp

    _, run_dir = gguf_run
    folder = run_dir / "quantize" / variant
    gguf, lora = gguf_export.variant_files("gguf-lora" if "lora" in variant else "gguf", folder)
    prompts = [
        {"ids": [], "text": f"Message: {row['text']}\nIntent:", "add_special": True}
        for _, row in read_jsonl(run_dir.parent.parent.parent / "test.jsonl")
    ]
    alone, together = llamacpp.call_in_child(_answers_together, str(gguf), prompts, str(lora) if lora else None)
    assert len(together) == 24
    same = [
        (a["prediction"], a["generated_tokens"], a["stopped"]) == (b["prediction"], b["generated_tokens"], b["stopped"])
        for a, b in zip(alone, together, strict=True)
    ]
    # f16: the same answers; on a q8_0 base llama.cpp's batched kernels round a little differently, which flips a
    # near-tie of this barely trained model now and then
    assert all(same) if variant == "gguf-f16" else sum(same) >= 23
    for a, b, equal in zip(alone, together, same, strict=True):
        if equal:
            assert b["confidence"] == pytest.approx(a["confidence"], abs=0.02)


def test_keeping_the_shared_prompt_prefix_in_llamacpp_changes_no_answer(gguf_run):
    from pipeline.runtimes import llamacpp

    _, run_dir = gguf_run
    prompts = [
        {"ids": [], "text": f"Message: {row['text']}\nIntent:", "add_special": True}
        for _, row in read_jsonl(run_dir.parent.parent.parent / "test.jsonl")
    ]
    fresh, kept = llamacpp.call_in_child(
        _answers_both_ways, str(run_dir / "quantize" / "gguf-f16" / "model.gguf"), prompts
    )
    assert len(fresh) == 24 and kept == fresh


@pytest.mark.parametrize(("runtime", "expected"), [("auto", "llama.cpp"), ("transformers", "transformers")])
def test_a_gguf_reference_answers_through_llamacpp_as_it_ships(gguf_run, tmp_path, runtime, expected):
    """The reference given as a .gguf file: through llama.cpp from the file itself (auto), or expanded for PyTorch."""
    loaded, run_dir = gguf_run
    f16 = run_dir / "quantize" / "gguf-f16" / "model.gguf"
    settings = [f"evaluate.reference={{model: {f16}, runtime: {runtime}}}"]
    runs = tmp_path / "runs"
    assert main(["run", str(loaded.path), "--runs-dir", str(runs), *[x for s in settings for x in ("--set", s)]]) == 0
    reference_run = runs / "gguf-test" / load_recipe(loaded.path, settings).run_id
    results = json.loads((reference_run / "evaluate" / "results.json").read_text())["candidates"]
    assert results["reference"]["runtime"] == expected
    reference = _predictions(reference_run, "reference")
    if runtime == "auto":  # the earlier run's f16 candidate: the same file through the same runtime
        assert results["reference"]["dtype"] == "f16"
        assert results["reference"]["size_on_disk_bytes"] == f16.stat().st_size
        f16_answers = _predictions(run_dir, "gguf-f16")
        assert [reference[i]["prediction"] for i in reference] == [f16_answers[i]["prediction"] for i in reference]
    else:
        assert results["reference"]["dtype"] == "float32"
    assert "| reference | reference | " + expected in (reference_run / "report" / "report.md").read_text()

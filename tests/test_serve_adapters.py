"""One base, many specialists, served (`specialist serve --adapters`): two tiny-model runs trained for different
answers on the same base, each with an adapter GGUF on the shared base GGUF, behind one OpenAI-compatible server
started as a user starts it. Requests alternate between the two model names: each gets its own adapter's answers,
the ones its evaluation scored."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.data import read_jsonl
from pipeline.recipe import load_recipe
from pipeline.runs import run_dir_for
from tests import llama_server, served_protocol

# make test-slow: two runs' adapter GGUFs served on one base
pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _recipe(write_recipe, tiny_models, intents_rows, name: str, target: str) -> Path:
    train, test = intents_rows
    return write_recipe(
        f"""
        name: {name}
        model:
          base: {tiny_models["base"]}
        data:
          train: {train}
          eval: {test}
          prompt: "Message: {{text}}\\nIntent:"
          target: "{target}"
          chat_template: never
        train: {{epochs: 3, batch_size: 16, lr: 5.0e-3, save_steps: 100}}
        quantize: [{{kind: gguf-lora, base_type: q8_0}}]
        evaluate: {{max_new_tokens: 6, batch_size: 1, bootstrap_samples: 100, latency_rows: 2}}  # as served
        """,
        f"{name}.yaml",
    )


def _generations(run_dir: Path, name: str) -> dict[int, str]:
    lines = (run_dir / "evaluate" / "generations" / f"{name}.jsonl").read_text().splitlines()[1:]
    return {entry["row"]: entry["prediction"] for entry in map(json.loads, lines)}


def test_one_base_serves_each_runs_adapter_by_model_name(write_recipe, tiny_models, intents_rows, tmp_path):
    runs = tmp_path / "runs"
    # two specialists on one base: one names the intent, the other repeats the message
    labels = _recipe(write_recipe, tiny_models, intents_rows, "intents", " {label}")
    echo = _recipe(write_recipe, tiny_models, intents_rows, "echo", " {text}")
    for recipe in (labels, echo):
        assert main(["run", str(recipe), "--runs-dir", str(runs)]) == 0
    dirs = {name: run_dir_for(load_recipe(r), runs) for name, r in (("intents", labels), ("echo", echo))}
    bases = {json.loads((d / "quantize" / "gguf-lora-q8_0" / "base.json").read_text())["file"] for d in dirs.values()}
    assert len(bases) == 1  # converted once, shared
    evaluated = {name: _generations(d, "gguf-lora-q8_0") for name, d in dirs.items()}
    texts = [row["text"] for _, row in read_jsonl(intents_rows[1])][:8]
    assert sum(evaluated["intents"][i] != evaluated["echo"][i] for i in range(len(texts))) >= 6  # they differ

    args = ["--adapters", str(labels), f"echo={dirs['echo']}", "--runs-dir", str(runs), "--threads", "1"]
    server = llama_server.Specialist(tmp_path / "server.log", *args, "--context", "512", "--max-waiting", "2")
    try:
        assert {m["id"] for m in server.get("/v1/models")["data"]} == {"intents", "echo"}
        for row, text in enumerate(texts):  # alternate adapters request by request, through both APIs
            for name in ("intents", "echo") if row % 2 else ("echo", "intents"):
                if row % 3:
                    status, _, body = server.post("/v1/completions", {"model": name, "prompt": text})
                    answer = body["choices"][0]["text"] if status == 200 else body
                else:
                    chat = {"model": name, "messages": [{"role": "user", "content": text}]}
                    status, _, body = server.post("/v1/chat/completions", chat)
                    answer = body["choices"][0]["message"]["content"] if status == 200 else body
                assert status == 200, answer
                assert body["model"] == name
                assert answer == evaluated[name][row], (name, row)  # the answer its evaluation scored
        status, _, body = server.post("/v1/completions", {"model": "nope", "prompt": texts[0]})
        assert status == 404 and "intents, echo" in body["error"]["message"]
        assert server.post("/v1/completions", {"prompt": texts[0]})[0] == 400  # two adapters: name one
        assert server.get("/adapters/stats")["requests"] == {"intents": len(texts), "echo": len(texts)}
        valid = {"model": "intents", "messages": [{"role": "user", "content": texts[0]}]}
        served_protocol.check(f"http://127.0.0.1:{server.port}", valid, bounded=True)
    finally:
        server.stop()

    # one server holds one base: an adapter made for another base file is refused, naming both
    from pipeline.errors import PipelineError
    from pipeline.serve import adapters

    about = dirs["echo"] / "quantize" / "gguf-lora-q8_0" / "base.json"
    other = tmp_path / "other-base.gguf"
    other.write_bytes(Path(next(iter(bases))).read_bytes())
    about.write_text(json.dumps({**json.loads(about.read_text()), "file": str(other)}))
    with pytest.raises(PipelineError, match=r"made for different bases \(intents: .*; echo: .*other-base.gguf\)"):
        adapters.load([str(labels), str(dirs["echo"])], runs)
    with pytest.raises(PipelineError, match="two runs would both be served as 'intents'; name them"):
        adapters.load([str(labels), str(dirs["intents"])], runs)

"""The served cascade (`specialist serve --cascade`) against two real llama.cpp servers on 127.0.0.1: the run's
GGUF specialist in the cascade's own process, and the reference behind llama.cpp's OpenAI-compatible server.
Each request is routed as the cascade stage measured it: the same confidence, the same threshold, the same
answers; and when the reference is down, the recipe decides between an error and the flagged local answer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.data import read_jsonl
from pipeline.recipe import load_recipe
from pipeline.runs import run_dir_for
from tests import llama_server, served_protocol

# make test-slow: two real llama.cpp servers and a served cascade
pytestmark = [pytest.mark.integration, pytest.mark.slow]

KEY_ENV = "SPECIALIST_TEST_CASCADE_KEY"
KEY = "sk-cascade-5e4d3c2b1a-never-in-a-file"


def _recipe(write_recipe, tiny_models, intents_rows, base_url: str) -> Path:
    train, test = intents_rows
    return write_recipe(f"""
        name: served-cascade
        model:
          base: {tiny_models["base"]}
        data:
          train: {train}
          eval: {test}
          validation: 24
          prompt: "Message: {{text}}\\nIntent:"
          target: " {{label}}"
          chat_template: never
        train: {{epochs: 2, batch_size: 16, lr: 5.0e-3, save_steps: 100}}
        quantize: [{{kind: gguf, type: f16}}]
        evaluate:
          max_new_tokens: 6
          batch_size: 1  # each row alone, as served: the same confidences to the last digit
          bootstrap_samples: 200
          latency_rows: 2
          gates: {{quantized_max_drop: null}}
          reference:
            model: {llama_server.ALIAS}
            system: "Reply with one intent label only."
            prompt: "Intents: cancel_order, track_order, return_item, refund_status, change_address, payment_failed, reset_password, update_email, product_availability, speak_to_human\\nMessage: {{text}}\\nIntent:"
            chat_template: auto
            endpoint: {{base_url: {base_url}, max_retries: 0, timeout_seconds: 30}}
        cascade: {{rule: max_defer, max_defer: 0.5}}
    """)  # noqa: E501


class Cascade(llama_server.Specialist):
    """`specialist serve --cascade` as a user starts it; requests carry the API key unless told otherwise."""

    def __init__(self, recipe: Path, runs: Path, log: Path, *extra: str):
        args = ["--cascade", str(recipe), "--runs-dir", str(runs), "--threads", "1", "--context", "512"]
        super().__init__(log, *args, "--api-key-env", KEY_ENV, *extra, env={KEY_ENV: KEY})

    def post(self, path: str, body: dict, key: str | None = KEY) -> tuple[int, dict, dict]:
        return super().post(path, body, key)


def _generations(run_dir: Path, name: str) -> dict[int, dict]:
    lines = (run_dir / "evaluate" / "generations" / f"{name}.jsonl").read_text().splitlines()[1:]
    return {entry["row"]: entry for entry in map(json.loads, lines)}


def test_the_served_cascade_routes_each_request_as_measured_and_the_recipe_decides_when_the_fallback_is_down(
    write_recipe, tiny_models, intents_rows, tmp_path
):
    reference = llama_server.start(tmp_path / "reference.log")
    cascade = None
    try:
        recipe = _recipe(write_recipe, tiny_models, intents_rows, reference.base_url)
        runs = tmp_path / "runs"
        assert main(["run", str(recipe), "--runs-dir", str(runs)]) in (0, 1)  # gates aside: the run finished
        run_dir = run_dir_for(load_recipe(recipe), runs)
        measured = json.loads((run_dir / "cascade" / "result.json").read_text())["candidates"]["gguf-f16"]
        threshold = measured["threshold"]
        local, answered = _generations(run_dir, "gguf-f16"), _generations(run_dir, "reference")
        texts = [row["text"] for _, row in read_jsonl(intents_rows[1])]

        cascade = Cascade(recipe, runs, tmp_path / "cascade.log")
        assert cascade.post("/v1/completions", {"prompt": texts[0]}, key=None)[0] == 401
        assert cascade.post("/v1/completions", {"prompt": "  "})[0] == 400
        seen = {"specialist": [], "reference": []}
        for row, text in enumerate(texts):
            body = {"messages": [{"role": "user", "content": text}]} if row % 2 else {"prompt": text}
            status, headers, response = cascade.post("/v1/chat/completions" if row % 2 else "/v1/completions", body)
            assert status == 200, response
            choice = response["choices"][0]
            answer = choice["message"]["content"] if row % 2 else choice["text"]
            # the same confidence as the evaluation's llama.cpp run of the same file, so the same routing
            assert response["cascade"]["confidence"] == pytest.approx(local[row]["confidence"], rel=1e-3, abs=1e-6)
            who = "specialist" if threshold is not None and local[row]["confidence"] >= threshold else "reference"
            assert response["cascade"]["answered_by"] == headers["x-cascade-answered-by"] == who
            # the answer the evaluation scored: the specialist's, or the reference's through its own prompt
            assert answer == (local if who == "specialist" else answered)[row]["prediction"]
            assert response["model"] == ("gguf-f16" if who == "specialist" else llama_server.ALIAS)
            seen[who].append(row)
        assert seen["specialist"] and seen["reference"], seen  # both ways are exercised
        stats = cascade.get("/cascade/stats")
        assert stats["requests"] == len(texts) and stats["answered_locally"] == len(seen["specialist"])
        assert stats["deferred"] == len(seen["reference"]) and stats["share_local"] == pytest.approx(
            measured["share_local"]
        )
        valid = {"messages": [{"role": "user", "content": texts[seen["specialist"][0]]}]}
        served_protocol.check(f"http://127.0.0.1:{cascade.port}", valid, key=KEY)

        reference.stop()  # the fallback is down: by default a deferred request is an error that says so
        deferred, sure = texts[seen["reference"][0]], texts[seen["specialist"][0]]
        status, _, response = cascade.post("/v1/completions", {"prompt": deferred})
        assert status == 502 and "--fallback-url" not in response["error"]["message"]
        assert "evaluate.reference.endpoint.base_url: cannot reach" in response["error"]["message"]
        assert cascade.post("/v1/completions", {"prompt": sure})[0] == 200  # what is answered locally still is
        assert cascade.get("/cascade/stats")["failed"] == 1
        cascade.stop()

        # ... or, where the recipe says so, the specialist's answer, flagged
        cascade = Cascade(recipe, runs, tmp_path / "cascade.log", "--set", "cascade.when_fallback_fails=answer_locally")
        status, headers, response = cascade.post("/v1/completions", {"prompt": deferred})
        assert status == 200 and headers["x-cascade-answered-by"] == "specialist"
        assert response["cascade"]["fallback_failed"] is True
        assert response["choices"][0]["text"] == local[seen["reference"][0]]["prediction"]
        assert cascade.get("/cascade/stats")["fallback_failed"] == 1
        assert KEY not in (tmp_path / "cascade.log").read_text()
    finally:
        if cascade is not None:
            cascade.stop()
        reference.stop()

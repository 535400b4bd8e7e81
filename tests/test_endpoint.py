"""A reference and a teacher behind an OpenAI-compatible API: against llama.cpp's real server on 127.0.0.1."""

import json
import threading
import time

import pytest

from pipeline.cli import main
from pipeline.recipe import load_recipe
from pipeline.runtimes import endpoint as endpoint_runtime
from tests import llama_server, served_protocol

pytestmark = pytest.mark.integration

KEY_ENV = "SPECIALIST_TEST_ENDPOINT_KEY"
KEY = "sk-test-1f2e3d4c5b6a-never-in-a-file"
SYSTEM = 'system: "Reply with one intent label only."'


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for the module, started with a key (its clients must send it)."""
    import os

    os.environ[KEY_ENV] = KEY
    try:
        running = llama_server.start(tmp_path_factory.mktemp("server") / "server.log", api_key_env=KEY_ENV)
    finally:
        del os.environ[KEY_ENV]
    yield running
    running.stop()


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)


def endpoint_recipe(
    write_recipe,
    tiny_models,
    intents_rows,
    base_url,
    *,
    reference='system: "Reply with one intent label only."',
    distill="",
):
    train, test = intents_rows
    return write_recipe(f"""
        name: endpoint-test
        model:
          base: {tiny_models["base"]}
        data:
          train: {train}
          eval: {test}
          prompt: "Message: {{text}}\\nIntent:"
          target: " {{label}}"
          chat_template: never
        train: {{epochs: 1, batch_size: 16, lr: 5.0e-3, save_steps: 100}}
        quantize: []
        evaluate:
          max_new_tokens: 6
          batch_size: 8
          bootstrap_samples: 200
          latency_rows: 3
          reference:
            model: {llama_server.ALIAS}
            prompt: "Intents: cancel_order, track_order, return_item, refund_status\\nMessage: {{text}}\\nIntent:"
            endpoint:
              base_url: {base_url}
              api_key_env: {KEY_ENV}
              concurrency: 2
              max_retries: 0
            price: {{input_per_million: 0.5, output_per_million: 2.0}}
            {reference}
        {distill}
    """)


def _every_file_text(folder) -> str:
    return "".join(p.read_text(errors="replace") for p in folder.rglob("*") if p.is_file())


def test_an_endpoint_reference_is_evaluated_through_the_server_and_priced(
    server, key, write_recipe, tiny_models, intents_rows, tmp_path, capsys
):
    recipe = endpoint_recipe(write_recipe, tiny_models, intents_rows, server.base_url)
    runs = tmp_path / "runs"
    before = server.requests()
    assert main(["run", str(recipe), "--runs-dir", str(runs)]) == 0
    run_dir = runs / "endpoint-test" / load_recipe(recipe).run_id
    report = json.loads((run_dir / "report" / "report.json").read_text())
    reference = report["candidates"]["reference"]
    assert reference["runtime"] == "endpoint"
    assert server.requests() - before == 24 + 3  # every eval row once, the latency rows, nothing else
    cache = [json.loads(line) for line in (run_dir / "evaluate/generations/reference.jsonl").read_text().splitlines()]
    answers = cache[1:]
    assert sorted(a["row"] for a in answers) == list(range(24))
    # the server's counts (llama.cpp may run past max_tokens to finish a multi-byte character)
    assert all(a["prompt_tokens"] > 20 and 0 < a["generated_tokens"] <= 8 for a in answers)
    tokens_in = sum(a["prompt_tokens"] for a in answers) / 24
    tokens_out = sum(a["generated_tokens"] for a in answers) / 24
    assert reference["prompt_tokens_per_example"] == pytest.approx(tokens_in)
    assert reference["cost_per_1000_answers"] == pytest.approx(1000 * (tokens_in * 0.5 + tokens_out * 2.0) / 1e6)
    assert reference["single_request_rows"] == 3 and reference["single_request_seconds_p50"] > 0
    assert reference["peak_memory_bytes"] is None and reference["parameters"] is None  # the server's, not ours
    assert report["candidates"]["specialized"]["cost_per_1000_answers"] is None  # local: no per-token price
    assert report["savings"]["saved_per_1000_answers"] == pytest.approx(reference["cost_per_1000_answers"])
    markdown = (run_dir / "report" / "report.md").read_text()
    assert "cost per 1,000 answers" in markdown and "no per-token price" in markdown
    assert f"saving USD {reference['cost_per_1000_answers']:.4g} per 1,000 answers" in markdown
    assert "answered through an OpenAI-compatible API" in markdown

    # A rerun asks nothing; more requests in flight or a new price keep the run and its answers.
    assert main(["run", str(recipe), "--runs-dir", str(runs)]) == 0
    override = [
        "--set",
        "evaluate.reference.endpoint.concurrency=4",
        "--set",
        "evaluate.reference.price.input_per_million=5",
    ]
    assert main(["run", str(recipe), "--runs-dir", str(runs), *override]) == 0
    assert server.requests() - before == 27
    repriced = json.loads((run_dir / "report" / "report.json").read_text())["candidates"]["reference"]
    assert repriced["cost_per_1000_answers"] == pytest.approx(1000 * (tokens_in * 5 + tokens_out * 2.0) / 1e6)

    output = capsys.readouterr()
    assert KEY not in output.out + output.err
    assert KEY not in _every_file_text(runs)


def test_plain_prompts_go_to_the_completions_api_with_the_servers_token_counts(server, key):
    client = endpoint_runtime.Client(
        endpoint_runtime.Endpoint("evaluate.reference", server.base_url, llama_server.ALIAS, KEY_ENV, 1, 30, 0, False)
    )
    (prompt,) = endpoint_runtime.prompts_for([_row("Message: where is my parcel\nIntent:")], chat=False, system=None)
    assert prompt.messages is None
    answer = client.ask(prompt, 4, logprobs=True)
    assert answer["generated_tokens"] <= 4 and answer["prompt_tokens"] >= 9
    assert 0 < answer["confidence"] <= 1  # from the completions API's token logprobs


def _row(prompt):
    from pipeline.data import TaskRow

    return TaskRow(target="x", source="test:1", prompt=prompt)


@pytest.mark.parametrize(
    ("setting", "env", "message", "code"),
    [
        (
            ["--set", "evaluate.reference.model=no-such-model"],
            {KEY_ENV: KEY},
            "evaluate.reference.model: 127.0.0.1:{port} does not serve 'no-such-model'; it serves: smollm2",
            2,
        ),
        (
            [],
            {KEY_ENV: "sk-wrong-key"},
            "evaluate.reference.endpoint.api_key_env: 127.0.0.1:{port} refused the key (401",
            2,
        ),
        ([], {}, f"evaluate.reference.endpoint.api_key_env: the environment variable {KEY_ENV} is not set", 2),
        (
            ["--set", "evaluate.reference.endpoint.base_url=http://127.0.0.1:{dead}/v1"],
            {KEY_ENV: KEY},
            "evaluate.reference.endpoint.base_url: cannot reach http://127.0.0.1:{dead}/v1 (endpoint.max_retries: 0)",
            3,
        ),
    ],
    ids=["unknown-model", "wrong-key", "key-not-set", "unreachable"],
)
def test_endpoint_errors_name_the_recipe_field(
    server, write_recipe, tiny_models, intents_rows, tmp_path, monkeypatch, capsys, setting, env, message, code
):
    monkeypatch.delenv(KEY_ENV, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    dead = llama_server.free_port()
    recipe = endpoint_recipe(write_recipe, tiny_models, intents_rows, server.base_url)
    runs = tmp_path / "runs"
    setting = [s.format(dead=dead) for s in setting]
    assert main(["run", str(recipe), "--runs-dir", str(runs), "--set", "evaluate.latency_rows=0", *setting]) == code
    err = capsys.readouterr().err
    assert message.format(port=server.port, dead=dead) in err
    assert "Traceback" not in err and KEY not in err and "sk-wrong-key" not in err


def test_a_key_written_where_its_variable_name_goes_is_refused_without_repeating_it(
    write_recipe, tiny_models, intents_rows, capsys
):
    recipe = endpoint_recipe(write_recipe, tiny_models, intents_rows, "http://127.0.0.1:9/v1")
    assert main(["validate", str(recipe), "--set", f"evaluate.reference.endpoint.api_key_env={KEY}"]) == 2
    err = capsys.readouterr().err
    assert "evaluate.reference.endpoint.api_key_env: must be the name of an environment variable" in err
    assert KEY not in err
    assert main(["validate", str(recipe), "--set", "evaluate.reference.endpoint.base_url=127.0.0.1:8080"]) == 2
    assert "base_url: must be an http:// or https:// URL" in capsys.readouterr().err


def test_the_run_id_follows_what_the_api_answers_not_how_it_is_asked(write_recipe, tiny_models, intents_rows):
    recipe = endpoint_recipe(write_recipe, tiny_models, intents_rows, "http://127.0.0.1:9/v1")
    run_id = load_recipe(recipe).run_id
    same = ["concurrency=9", "timeout_seconds=5", "max_retries=1", "api_key_env=OTHER_KEY"]
    for setting in same:
        assert load_recipe(recipe, [f"evaluate.reference.endpoint.{setting}"]).run_id == run_id, setting
    assert load_recipe(recipe, ["evaluate.reference.price.output_per_million=9"]).run_id == run_id
    assert load_recipe(recipe, ["evaluate.reference.model=other"]).run_id != run_id
    assert load_recipe(recipe, ["evaluate.reference.endpoint.base_url=http://127.0.0.1:10/v1"]).run_id != run_id


@pytest.mark.slow  # make test-slow: a labelling killed mid-way, then resumed
def test_a_teacher_stopped_mid_labelling_resumes_without_asking_a_row_twice(
    key, write_recipe, tiny_models, intents_rows, tmp_path, capsys
):
    train, _ = intents_rows
    port = llama_server.free_port()
    first = llama_server.start(tmp_path / "first.log", port=port, api_key_env=KEY_ENV)
    distill = f"distill: {{inputs: {train}, max_inputs: 40}}"
    recipe = endpoint_recipe(
        write_recipe, tiny_models, intents_rows, first.base_url, reference="chat_template: never", distill=distill
    )
    runs = tmp_path / "runs"
    answers = runs / "endpoint-test" / "distill-answers.jsonl"

    def stop_after_some_answers():
        while first.process.poll() is None:
            if answers.is_file() and len(answers.read_text().splitlines()) >= 8:
                first.process.kill()  # as a crash or a pulled plug would
            time.sleep(0.05)

    watcher = threading.Thread(target=stop_after_some_answers, daemon=True)
    watcher.start()
    try:
        assert main(["distill", str(recipe), "--runs-dir", str(runs)]) == 3
    finally:
        first.stop()
        watcher.join(timeout=10)
    err = capsys.readouterr().err
    assert "cannot reach" in err and "Answered rows are cached: rerun to continue" in err
    kept = len(answers.read_text().splitlines())
    assert 8 <= kept < 40

    second = llama_server.start(tmp_path / "second.log", port=port, api_key_env=KEY_ENV)
    try:
        assert main(["distill", str(recipe), "--runs-dir", str(runs)]) == 0
        assert second.requests() == 40 - kept  # only the rows the first server never answered
    finally:
        second.stop()
    assert f"{40 - kept} of 40 inputs to label ({kept} cached)" in capsys.readouterr().err
    run_dir = runs / "endpoint-test" / load_recipe(recipe).run_id
    result = json.loads((run_dir / "distill" / "result.json").read_text())
    assert result["teacher_runtime"] == "endpoint" and result["inputs"] == 40
    assert result["labelled"] + result["dropped"] == 40 and result["teacher_prompt_tokens"] > 0
    labelled = [json.loads(line) for line in (run_dir / "distill" / "labelled.jsonl").read_text().splitlines()]
    by_key = {json.loads(line)["key"]: json.loads(line) for line in answers.read_text().splitlines()}
    assert sorted(row["label"] for row in labelled) == sorted(
        a["prediction"] for a in by_key.values() if a["prediction"]
    )
    assert KEY not in _every_file_text(runs)


def test_a_priced_teacher_behind_an_api_puts_its_labelling_cost_in_the_report():
    from pipeline.recipe import PriceSection
    from pipeline.render.markdown import distillation_markdown
    from pipeline.stages.report import distillation

    labelling = {
        "teacher": "gpt-x", "inputs": 400, "labelled": 390, "dropped": 10, "teacher_seconds": 200.0,
        "teacher_seconds_per_input": 0.5, "teacher_prompt_tokens": 32_000, "teacher_generated_tokens": 1_000,
    }  # fmt: skip
    price = PriceSection(input_per_million=0.5, output_per_million=2.0)
    found = distillation({"candidates": {}}, labelling, {}, 0, 60.0, teacher_is_reference=False, price=price)
    assert found["labelling_cost"]["total"] == pytest.approx((32_000 * 0.5 + 1_000 * 2.0) / 1e6)
    lines = distillation_markdown({"distillation": found, "metric": "exact_match"})
    assert any(
        "Labelling cost USD 0.018 at the teacher's price (32,000 prompt and 1,000 answer tokens)" in x for x in lines
    )
    local = {k: v for k, v in labelling.items() if k != "teacher_prompt_tokens"}  # a local teacher: no server counts
    assert distillation({"candidates": {}}, local, {}, 0, 60.0, False, price=price)["labelling_cost"] is None


class _StubAPI:
    """A few lines of OpenAI protocol on 127.0.0.1 for what a real server will not do on demand: refuse for
    its rate limit `limited` times before answering, or answer with no text."""

    def __init__(self, limited: int, content="track_order", listed="stub"):
        import http.server

        self.calls = 0
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status, body, headers=()):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in headers:
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):  # the model list
                self._send(200, {"object": "list", "data": [{"id": listed, "object": "model"}]})

            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                stub.calls += 1
                if stub.calls <= limited:
                    error = {"error": {"message": "Rate limit reached for requests", "type": "requests"}}
                    self._send(429, error, [("Retry-After", "0")])
                    return
                message = {"role": "assistant", "content": content}
                choice = {"index": 0, "message": message, "finish_reason": "stop", "logprobs": None}
                usage = {"prompt_tokens": 12, "completion_tokens": 2, "total_tokens": 14}
                body = {"id": "x", "object": "chat.completion", "created": 0, "model": "stub", "choices": [choice]}
                self._send(200, {**body, "usage": usage})

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize(("limited", "retries", "answered"), [(2, 3, True), (5, 2, False)])
def test_rate_limits_are_retried_with_backoff_then_named(limited, retries, answered):
    stub = _StubAPI(limited)
    try:
        endpoint = endpoint_runtime.Endpoint("distill.teacher", stub.base_url, "stub", None, 1, 10, retries, True)
        client = endpoint_runtime.Client(endpoint)
        (prompt,) = endpoint_runtime.prompts_for([_row("Message: where is it\nIntent:")], chat=True, system="Be brief")
        assert prompt.messages == (
            {"role": "system", "content": "Be brief"},
            {"role": "user", "content": "Message: where is it\nIntent:"},
        )
        if answered:
            answer = client.ask(prompt, 4)
            assert answer["prediction"] == "track_order" and answer["prompt_tokens"] == 12
            assert stub.calls == limited + 1  # refused twice, then answered on the third try
        else:
            with pytest.raises(endpoint_runtime.RemoteError) as error:
                client.ask(prompt, 4)
            assert stub.calls == retries + 1
            message = str(error.value)
            assert message.startswith("distill.teacher: 127.0.0.1:")
            assert "still refused for its rate limit (429) after 2 retries with backoff" in message
            assert "lower distill.teacher.endpoint.concurrency (now 1)" in message
    finally:
        stub.close()


def test_a_response_without_text_is_named():
    from pipeline.errors import PipelineError

    stub = _StubAPI(0, content=None)
    try:
        endpoint = endpoint_runtime.Endpoint("evaluate.reference", stub.base_url, "stub", None, 1, 10, 0, True)
        (prompt,) = endpoint_runtime.prompts_for([_row("Q")], chat=True, system=None)
        with pytest.raises(PipelineError, match=r"evaluate.reference: 127.0.0.1:\d+ answered 'stub' with no text"):
            endpoint_runtime.Client(endpoint).ask(prompt, 4)
    finally:
        stub.close()


def test_a_model_listed_with_ollamas_latest_tag_is_served_under_its_bare_name():
    from pipeline.errors import PipelineError

    stub = _StubAPI(0, listed="qwen2.5:latest")
    try:
        for name in ("qwen2.5", "qwen2.5:latest"):
            endpoint_runtime.Client(
                endpoint_runtime.Endpoint("evaluate.reference", stub.base_url, name, None, 1, 10, 0, True)
            ).check()
        other = endpoint_runtime.Endpoint("evaluate.reference", stub.base_url, "qwen3", None, 1, 10, 0, True)
        with pytest.raises(PipelineError, match="does not serve 'qwen3'; it serves: qwen2.5:latest"):
            endpoint_runtime.Client(other).check()
    finally:
        stub.close()


def test_an_api_teachers_loosely_spelled_choice_is_that_choice():
    from pipeline.teacher import as_choice

    choices = ["track_order", "Refund status", "cancel_order"]
    assert as_choice("Track_Order", choices) == "track_order"
    assert as_choice("`track_order`.", choices) == "track_order"
    assert as_choice('"refund STATUS"', choices) == "Refund status"
    assert as_choice("track order", choices) is None  # a different spelling is not guessed
    assert as_choice("change_email", choices) is None
    assert as_choice("x", ["X", "x."]) is None  # ambiguous: neither


def test_validate_notes_an_api_that_does_not_answer_now(server, key, write_recipe, tiny_models, intents_rows, capsys):
    dead = f"http://127.0.0.1:{llama_server.free_port()}/v1"
    for base_url, silent in ((server.base_url, False), (dead, True)):
        recipe = endpoint_recipe(write_recipe, tiny_models, intents_rows, base_url)
        assert main(["validate", str(recipe)]) == 0  # a note: the run may start where the API is reachable
        out = capsys.readouterr().out
        assert ("does not answer now" in out) == silent
        assert f"evaluate.reference: smollm2 through the API at {base_url}, priced USD 0.5 / 2 per million" in out


def test_the_gguf_server_refuses_malformed_requests_streams_and_takes_many_at_once(server):
    """`specialist serve MODEL` is llama.cpp's own server: the shared suite holds for it too."""
    valid = {"model": llama_server.ALIAS, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8,
             "temperature": 0}  # fmt: skip
    served_protocol.check(f"http://127.0.0.1:{server.port}", valid, key=KEY)

"""Synthesis: a teacher writes new training rows from a description and a few seed rows, the rows are checked,
and the specialist trains on seeds + kept rows. The teacher here is a few lines of OpenAI protocol on 127.0.0.1
that writes what a test needs (duplicates, a copy of a seed, a copy of an eval row, a row it labels otherwise);
a local tiny teacher exercises sampling in the transformers runtime."""

import http.server
import json
import re
import threading

import pytest

from pipeline.cli import main
from pipeline.data import read_jsonl
from pipeline.recipe import load_recipe
from pipeline.stages import synthesize
from tests.conftest import INTENTS

pytestmark = pytest.mark.integration

LABELS = ["cancel_order", "refund_status", "return_item", "track_order"]
WORDS = {"cancel_order": "cancel", "refund_status": "refund", "return_item": "send back", "track_order": "where is"}


class TeacherAPI:
    """Writes rows when asked to write (the synthesis prompt says 'Write'), labels by keyword when asked to label.

    Every reply is a function of the request alone (its prompt and seed), as a seeded sampler's would be."""

    def __init__(self, seed_copy: str, eval_copy: str, wrong: bool = False):
        self.requests: list[dict] = []
        api = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, body):
                out = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def do_GET(self):
                self._send({"object": "list", "data": [{"id": "teacher", "object": "model"}]})

            def do_POST(self):
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                api.requests.append(request)
                prompt = request["messages"][-1]["content"]
                if "Do not write messages" in prompt:  # asked to propose variations
                    content = api.propose(prompt, request.get("seed"))
                elif "Write" in prompt:
                    content = api.write(prompt, request.get("seed"))
                else:
                    content = api.label(prompt, wrong)
                message = {"role": "assistant", "content": content}
                choice = {"index": 0, "message": message, "finish_reason": "stop", "logprobs": None}
                usage = {"prompt_tokens": 40, "completion_tokens": 30, "total_tokens": 70}
                self._send({"id": "x", "object": "chat.completion", "created": 0, "model": "teacher",
                            "choices": [choice], "usage": usage})  # fmt: skip

        self.seed_copy, self.eval_copy = seed_copy, eval_copy
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def write(self, prompt: str, seed) -> str:
        label = re.search(r'label "(\w+)"', prompt).group(1)
        count = int(re.search(r"Write (\d+)", prompt).group(1))
        word = WORDS[label]
        rows = [f"please {word} thing number {seed % 997} part {k}" for k in range(count)]
        if label == "track_order":  # a repeat, a seed row, an eval row, and a row about another label
            rows[1] = rows[0]
            rows[2] = self.seed_copy
            rows[3] = self.eval_copy
            rows[4] = f"please cancel thing number {seed % 997}"
        return "Here you go:\n" + "\n".join(f"{k + 1}. {row}" for k, row in enumerate(rows))

    def propose(self, prompt: str, seed) -> str:
        count = int(re.search(r"List (\d+)", prompt).group(1))
        ways = [f"Write them as customer number {seed % 97 + k}." for k in range(count)]
        return "Some ideas:\n" + "\n".join(f"{k + 1}. **{way}**" for k, way in enumerate(ways))

    def label(self, prompt: str, wrong: bool) -> str:
        message = prompt.split("Message:")[-1].lower()
        at = {label: message.find(word) for label, word in WORDS.items() if word in message}
        return "cancel_order" if wrong else min(at, key=at.get, default="track_order")

    def writes(self) -> list[dict]:
        return [r for r in self.requests if re.search(r"Write \d+", r["messages"][-1]["content"])]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def seeded(tmp_path):
    """Five seed rows per label (from the shipped training rows, each given the stub's keyword), the gold test rows."""
    rows = [row for _, row in read_jsonl(INTENTS / "train.jsonl") if row["label"] in LABELS]
    seeds = []
    for label in LABELS:
        mine = [row for row in rows if row["label"] == label][:5]
        seeds += [{"text": f"{WORDS[label]} {row['text']}", "label": label} for row in mine]
    (tmp_path / "seeds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in seeds))
    test = [row for _, row in read_jsonl(INTENTS / "test.jsonl") if row["label"] in LABELS][:16]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test))
    return seeds, test


@pytest.fixture
def api(seeded):
    seeds, test = seeded
    teacher = TeacherAPI(seed_copy=seeds[-1]["text"], eval_copy=test[0]["text"])
    yield teacher
    teacher.close()


def recipe_text(tiny_models, base_url, synth_extra="", per_label=10, reference=None):
    """The recipe the tests share: the teacher behind base_url, or `reference` (a local model's folder)."""
    teacher = (
        f"reference: {{model: {reference}}}"
        if reference
        else f"""reference:
            model: teacher
            prompt: "Intents: cancel_order, track_order, return_item, refund_status\\nMessage: {{text}}\\nIntent:"
            endpoint: {{base_url: {base_url}, concurrency: 2, max_retries: 0}}"""
    )
    return f"""
        name: synth-test
        model: {{base: {tiny_models["base"]}}}
        data:
          train: seeds.jsonl
          eval: test.jsonl
          prompt: "Message: {{text}}\\nIntent:"
          target: " {{label}}"
          chat_template: never
        synthesize:
          description: Messages customers send to an online shop's support chat.
          per_label: {per_label}
          rows_per_ask: 5
          near_duplicate: null
          {synth_extra}
        train: {{epochs: 1, batch_size: 16, lr: 5.0e-3}}
        quantize: []
        evaluate:
          max_new_tokens: 6
          batch_size: 8
          bootstrap_samples: 200
          latency_rows: 2
          {teacher}
    """


def test_the_teacher_writes_rows_that_are_checked_and_trained_on(write_recipe, tiny_models, api, tmp_path, seeded):
    recipe = write_recipe(recipe_text(tiny_models, api.base_url))
    runs = tmp_path / "runs"
    assert main(["run", str(recipe), "--runs-dir", str(runs)]) == 0
    run_dir = runs / "synth-test" / load_recipe(recipe).run_id
    result = json.loads((run_dir / "synthesize" / "result.json").read_text())
    assert result["teacher_score"]["on"] == "seed" and result["teacher_score"]["accuracy"] == 1.0
    assert result["asks"] == 8 and result["rows_written"] == 40
    # track_order's two asks each wrote a repeat, a copy of a seed row, a copy of an eval row and a row about
    # cancelling; a copy is dropped once per ask and the second ask's copy of the same text too
    assert result["dropped"] == {"duplicate": 2, "copy_of_seed": 2, "contamination": 2, "label_disagrees": 2}
    assert result["rows_kept"] == 32 and result["balance"]["track_order"] == {"asked": 10, "kept": 2}
    assert result["label_check"]["per_label"]["track_order"] == pytest.approx(2 / 4)
    assert result["label_check"]["per_label"]["cancel_order"] == 1.0
    kept = [row for _, row in read_jsonl(run_dir / "synthesize" / "rows.jsonl")]
    assert len(kept) == 32 and set(kept[0]) == {"text", "label"}  # the data's own columns
    assert all(WORDS[row["label"]] in row["text"] for row in kept)
    candidates = [json.loads(line) for line in (run_dir / "synthesize" / "candidates.jsonl").read_text().splitlines()]
    assert {c["verdict"]["reason"] for c in candidates} == {"kept", *result["dropped"]}
    assert all(c["variation"] and c["examples"] for c in candidates)  # what each row was asked with
    train = json.loads((run_dir / "train" / "result.json").read_text())
    assert train["rows"] == 20 + 32
    report = json.loads((run_dir / "report" / "report.json").read_text())
    assert report["synthesis"]["rows_kept"] == 32
    # the seed-only specialist: an ordinary run of the recipe without synthesize:, evaluated beside, paired
    sibling = runs / "synth-test" / load_recipe(recipe, [], assign={"synthesize": None}).run_id
    assert json.loads((sibling / "train" / "result.json").read_text())["rows"] == 20
    assert report["candidates"]["seed-only"]["role"] == "seed_only" and "seed-only" in report["comparisons"]
    assert "What the rows bought:" in (run_dir / "report" / "report.md").read_text()
    assert "## Synthetic rows" in (run_dir / "report" / "report.md").read_text()
    page = (run_dir / "report" / "report.html").read_text()
    assert "<h2>Synthetic rows</h2>" in page
    assert "Labelled otherwise by the teacher&#39;s blind check: 2 dropped" in page
    # seeded: each ask's seed is sent, and the same recipe sends the same seeds
    seeds_sent = [r["seed"] for r in api.writes()]
    assert len(seeds_sent) == 8 and len(set(seeds_sent)) == 8

    # another training setting asks the teacher nothing again (the new run's evaluation asks it the eval rows)
    _, test = seeded

    def synthesis_requests():
        return [r for r in api.requests if not any(row["text"] in r["messages"][-1]["content"] for row in test)]

    asked = len(synthesis_requests())
    assert main(["run", str(recipe), "--runs-dir", str(runs), "--set", "train.epochs=2"]) == 0
    assert len(synthesis_requests()) == asked
    # a changed prompt asks anew (only the writing: the labels of the same texts are cached)
    changed = ["--set", 'synthesize.variations=["in a hurry"]']
    assert main(["synthesize", str(recipe), "--runs-dir", str(runs), *changed]) == 0
    assert len(api.writes()) == 16

    # the teacher proposes variations first (one ask, cached); they join the recipe's, and the asks use them
    proposing = ["--set", 'synthesize.variations=["in a hurry"]', "--set", "synthesize.propose_variations=3"]
    assert main(["synthesize", str(recipe), "--runs-dir", str(runs), *proposing]) == 0
    proposed_dir = runs / "synth-test" / load_recipe(recipe, proposing[1::2]).run_id
    result = json.loads((proposed_dir / "synthesize" / "result.json").read_text())
    (ask,) = [r for r in api.requests if "Do not write messages" in r["messages"][-1]["content"]]
    ways = [f"Write them as customer number {ask['seed'] % 97 + k}." for k in range(3)]
    assert result["proposed_variations"] == ways  # numbering and bold removed
    asked_with = {json.loads(line)["variation"] for line in (proposed_dir / "synthesize" / "candidates.jsonl").open()}
    assert asked_with <= {"in a hurry", *ways} and asked_with & set(ways)
    assert result["teacher_cost"]["proposing"]["asks"] == 1
    before = len(api.requests)
    assert main(["synthesize", str(recipe), "--runs-dir", str(runs), *proposing]) == 0  # the stage again
    assert len(api.requests) == before  # asked again: every answer from the cache


def test_a_teacher_below_the_bar_writes_nothing(write_recipe, tiny_models, seeded, tmp_path, capsys):
    seeds, test = seeded
    wrong = TeacherAPI(seeds[-1]["text"], test[0]["text"], wrong=True)
    try:
        recipe = write_recipe(recipe_text(tiny_models, wrong.base_url, "min_teacher_score: 0.5"))
        assert main(["synthesize", str(recipe), "--runs-dir", str(tmp_path / "runs")]) == 1
        assert "synthesize.min_teacher_score: the teacher (teacher) labels 0.250 of the 20 seed rows" in (
            capsys.readouterr().err
        )
        assert wrong.writes() == []
    finally:
        wrong.close()


def test_replies_are_split_into_rows():
    reply = 'Sure! Here are some:\n1. "Where is my parcel?"\n2) cancel it now\n\n- third one\n3: fourth\nThanks'
    assert synthesize.parse_reply(reply, 10) == ["Where is my parcel?", "cancel it now", "third one", "fourth"]
    assert synthesize.parse_reply("just one line\nand another", 1) == ["just one line"]
    bold = '1. **Help! I need a new email.**\n2. "**quoted bold**"\n3. \u201ccurly\u201d\n4. 5\n5. ---'
    assert synthesize.parse_reply(bold, 10) == ["Help! I need a new email.", "quoted bold", "curly"]
    assert synthesize.parse_reply("", 5) == []
    fenced = "```json\nwhat time is it\nset an alarm\n```"  # a code fence is not a row
    assert synthesize.parse_reply(fenced, 5) == ["what time is it", "set an alarm"]


def test_asks_are_seeded_per_label_and_show_only_that_labels_seeds(write_recipe, tiny_models, seeded):
    recipe = load_recipe(write_recipe(recipe_text(tiny_models, "http://127.0.0.1:9/v1", per_label=7)))
    the_task = synthesize.task(recipe.recipe)
    asks = synthesize.plan_asks(recipe.recipe, the_task)
    assert [a["count"] for a in asks if a["label"] == "track_order"] == [5, 2]
    assert asks == synthesize.plan_asks(recipe.recipe, the_task)
    by_source = {s.source: s.label for s in the_task.seeds}
    assert all(by_source[source] == a["label"] for a in asks for source in a["examples"])
    assert len({a["seed"] for a in asks}) == len(asks)


def test_a_local_teacher_samples_from_each_asks_seed_and_its_answers_are_cached(
    write_recipe, tiny_models, seeded, tmp_path
):
    """The tiny reference writes (nonsense) rows in the transformers runtime: the same seeds draw the same rows, other
    seeds other rows, and a rerun asks nothing."""
    text = recipe_text(tiny_models, "", "max_new_tokens: 24", per_label=2, reference=tiny_models["reference"])
    recipe = write_recipe(text.replace("rows_per_ask: 5", "rows_per_ask: 2"))
    runs = tmp_path / "runs"

    def written(*overrides):
        assert main(["synthesize", str(recipe), "--runs-dir", str(runs), *overrides]) == 0
        run_dir = runs / "synth-test" / load_recipe(recipe, [o for o in overrides if o != "--set"]).run_id
        result = json.loads((run_dir / "synthesize" / "result.json").read_text())
        lines = (run_dir / "synthesize" / "candidates.jsonl").read_text().splitlines()
        return result, [json.loads(line)["text"] for line in lines]

    first, texts = written()
    assert first["teacher_runtime"] == "transformers" and first["asks"] == 4
    assert first["teacher_cost"]["writing"]["from_cache"] == 0
    (runs / "synth-test" / "synthesize-answers.jsonl").unlink()  # asked again from scratch: the same draws
    again, same = written()
    assert same == texts and again["teacher_cost"]["writing"]["from_cache"] == 0
    cached, _ = written()
    assert cached["teacher_cost"]["writing"]["from_cache"] == 4 and cached["teacher_cost"]["scoring"]["from_cache"] > 0
    _, other = written("--set", "synthesize.seed=1")
    assert other != texts


def test_the_llamacpp_sampler_draws_from_the_rows_seed_within_top_p():
    import numpy as np

    from pipeline.runtimes import Sampling
    from pipeline.runtimes.llamacpp import _Draw

    logits = np.array([5.0, 4.0, 1.0, -3.0], dtype=np.float32)
    sampling = Sampling(temperature=1.0, top_p=0.9, seeds=[0])
    draws = [_Draw(sampling, 7).token(logits) for _ in range(3)]
    assert draws == [_Draw(sampling, 7).token(logits) for _ in range(3)]  # a seed draws the same
    picked = {_Draw(sampling, seed).token(logits) for seed in range(200)}
    assert picked == {0, 1}  # tokens 2 and 3 lie outside the top 90% of the probability
    assert {_Draw(Sampling(1.0, 0.01, [0]), seed).token(logits) for seed in range(50)} == {0}
    hot = {_Draw(Sampling(2.0, 1.0, [0]), seed).token(logits) for seed in range(400)}
    assert hot == {0, 1, 2, 3}


def test_the_packaged_encoder_finds_paraphrases_closer_than_other_requests():
    from pipeline import row_checks
    from pipeline.embeddings import Encoder

    encoder = Encoder("packaged:all-minilm-l6-v2", "synthesize.encoder")
    vectors = encoder.embed(["Where is my parcel?", "where is my parcel please", "I forgot my password"])
    assert vectors.shape == (3, 384)
    similarity = vectors @ vectors.T
    assert similarity[0, 1] > 0.85 and similarity[0, 2] < 0.4
    verdicts = row_checks.check_rows(
        ["where is my parcel?", "I want my money back", "Where is my parcel please?"], [], [], encoder.embed, 0.85
    )
    assert verdicts.kept == [0, 1] and verdicts.dropped[2]["reason"] == "near_duplicate"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ('prompt: "Message: {text} {topic}\\nIntent:"', "data.prompt: synthesize: the teacher writes one input"),
        ("synthesize_extra: 'labels: [a, a]'", "synthesize.labels: lists a label twice"),
        (
            "synthesize_extra: 'prompt: \"Write {count} rows about {topic}\"'",
            "synthesize.prompt: unknown field(s) topic",
        ),
        ("no_reference", "synthesize: needs a teacher: add synthesize.teacher, or evaluate.reference"),
    ],
)
def test_a_synthesize_recipe_that_cannot_work_is_refused_with_its_field(
    write_recipe, tiny_models, seeded, change, message
):
    from pipeline.recipe import RecipeError

    text = recipe_text(tiny_models, "http://127.0.0.1:9/v1")
    if change.startswith("prompt:"):
        text = text.replace('prompt: "Message: {text}\\nIntent:"', change)
    elif change.startswith("synthesize_extra:"):
        extra = change.split(": ", 1)[1].strip("'")
        text = text.replace("near_duplicate: null", f"near_duplicate: null\n          {extra}")
    else:
        head, _, _ = text.partition("          reference:")
        text = head
    with pytest.raises(RecipeError) as error:
        load_recipe(write_recipe(text))
    assert message in str(error.value)


def test_validate_says_which_labels_the_teacher_writes_without_seeds(write_recipe, tiny_models, seeded, capsys):
    text = recipe_text(tiny_models, "http://127.0.0.1:9/v1", "labels: [cancel_order, lost_parcel]")
    assert main(["validate", str(write_recipe(text))]) == 0
    out = capsys.readouterr().out
    assert "writes 10 rows for each of 2 labels (4 asks" in out
    assert "lost_parcel: no seed row in data.train" in out
    assert "seed rows of refund_status, return_item, track_order are not in synthesize.labels" in out


def test_a_curve_over_the_teachers_rows_keeps_the_seeds_whole_and_asks_nothing_again(
    write_recipe, tiny_models, api, tmp_path
):
    from pipeline import sweep

    curve = "learning_curve: {fractions: [0.5, 1.0], over: synthesized}"
    text = recipe_text(tiny_models, api.base_url).rstrip(" ") + f"        {curve}\n"
    text = text.replace("chat_template: never", "chat_template: never\n          validation: 4")  # a curve chooses
    recipe = write_recipe(text)
    runs = tmp_path / "runs"
    assert main(["run", str(recipe), "--runs-dir", str(runs)]) == 0
    curve = json.loads((sweep.summary_dir(load_recipe(recipe), runs, "curve") / "curve.json").read_text())
    points = curve["points"]
    assert [p["fraction"] for p in points] == [0.0, 0.5, 1.0]  # share 0: the seed-only specialist
    assert [p["gold_rows"] for p in points] == [16, 16, 16]  # the seed rows whole at every share (4 validate)
    kept = points[-1]["synthesized_rows"]
    assert kept > 20 and [p["synthesized_rows"] for p in points] == [0, round(kept / 2), kept]
    assert [p["rows"] for p in points] == [16 + p["synthesized_rows"] for p in points]
    assert len(api.writes()) == 8  # the share's run read the teacher's rows from the cache
    per_row = curve["labelling"]["seconds_per_row"]
    assert [p["teacher_seconds"] for p in points] == pytest.approx([p["synthesized_rows"] * per_row for p in points])
    full = sweep.main_run(load_recipe(recipe), runs)  # the recipe's own run: the curve's last point
    report = json.loads((runs / "synth-test" / full.run_id / "report" / "report.json").read_text())
    assert points[0]["value"] == report["candidates"]["seed-only"]["metrics"]["exact_match"]["value"]
    shown = (sweep.summary_dir(load_recipe(recipe), runs, "curve") / "curve.md").read_text()
    half = points[1]
    assert "against the teacher's rows" in shown and f"| 0.5 | {half['rows']} ({half['synthesized_rows']}) |" in shown


class JsonTeacherAPI(TeacherAPI):
    """Writes inputs when asked to write, and answers each input with a JSON object, except where a test needs
    an answer that is no JSON (part 2) or lacks a key every seed answer has (part 3)."""

    def write(self, prompt: str, seed) -> str:
        count = int(re.search(r"Write (\d+)", prompt).group(1))
        return "\n".join(f"{k + 1}. please cancel thing number {seed % 997} part {k}" for k in range(count))

    def label(self, prompt: str, wrong: bool) -> str:
        message = prompt.split("Request:")[-1]
        if "part 2" in message:
            return "sorry, I cannot parse that"
        if "part 3" in message:
            return '{"intent": "cancel_order"}'
        word = next((label for label, w in WORDS.items() if w in message.lower()), "track_order")
        return f'Here: {{"intent": "{word}", "slots": {{}}}}'


def test_a_json_task_gets_inputs_the_teacher_answers_and_answers_without_the_seeds_shape_are_dropped(
    write_recipe, tiny_models, seeded, tmp_path
):
    seeds, test = seeded
    for name, rows in (("seeds.jsonl", seeds), ("test.jsonl", test)):
        parsed = [{"text": r["text"], "parse": {"intent": r["label"], "slots": {}}} for r in rows]
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in parsed))
    api = JsonTeacherAPI(seed_copy="", eval_copy="")
    try:
        text = recipe_text(tiny_models, api.base_url, "rows: 20").replace('target: " {label}"', 'target: " {parse}"')
        teacher_prompt = "Intents: cancel_order, track_order, return_item, refund_status\\nMessage: {text}\\nIntent:"
        text = text.replace(teacher_prompt, "Request: {text}\\nJSON:")
        text = text.replace("max_new_tokens: 6", "max_new_tokens: 24\n          metrics: [json_match]")
        recipe = write_recipe(text)
        runs = tmp_path / "runs"
        assert main(["validate", str(recipe)]) == 0
        assert main(["run", str(recipe), "--runs-dir", str(runs)]) == 0
    finally:
        api.close()
    run_dir = runs / "synth-test" / load_recipe(recipe).run_id
    result = json.loads((run_dir / "synthesize" / "result.json").read_text())
    assert result["answers"] == "json" and result["json_keys"] == ["intent", "slots"]
    assert result["teacher_score"]["metric"] == "json_match" and result["teacher_score"]["accuracy"] == 1.0
    assert result["asks"] == 4 and result["rows_written"] == 20  # rows 20, 5 an ask
    # each ask's part 2 answered with no JSON, its part 3 without the slots every seed answer has
    assert result["dropped"] == {"answer_not_json": 4, "answer_shape": 4} and result["rows_kept"] == 12
    kept = [row for _, row in read_jsonl(run_dir / "synthesize" / "rows.jsonl")]
    assert all(row["parse"] == {"intent": "cancel_order", "slots": {}} for row in kept)  # the object, as seeds hold it
    assert json.loads((run_dir / "train" / "result.json").read_text())["rows_synthesized"] == 12
    shown = (run_dir / "report" / "report.md").read_text()
    assert "(inputs; the teacher then answered each, as JSON with the keys intent, slots)" in shown
    assert "Answered by the teacher with no JSON: 4 dropped" in shown

"""Data: sources, formats, loss masks (checked by decoding exactly the labelled tokens), splits, packing."""

import json

import pandas as pd
import pytest
import torch

from pipeline import data
from pipeline.data import IGNORE_INDEX, TaskRow
from pipeline.errors import PipelineError, RemoteError
from pipeline.models import ModelSource, load_model, load_tokenizer
from pipeline.recipe import DataSection, data_fingerprint

CHATML = (
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<eos>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture
def tokenizer(tiny_models):
    return load_tokenizer(ModelSource(str(tiny_models["base"]), None, True))


@pytest.fixture
def chat_tokenizer(tokenizer):
    tokenizer.chat_template = CHATML
    return tokenizer


def labelled(tokenizer, example) -> str:
    return tokenizer.decode(
        [t for t, lab in zip(example["input_ids"], example["labels"], strict=True) if lab != IGNORE_INDEX]
    )


def masked(tokenizer, example) -> str:
    return tokenizer.decode(
        [t for t, lab in zip(example["input_ids"], example["labels"], strict=True) if lab == IGNORE_INDEX]
    )


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def section(tmp_path, rows, eval_rows=None, **kw) -> DataSection:
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    evaluation = write_jsonl(tmp_path / "eval.jsonl", eval_rows) if eval_rows is not None else None
    kw.setdefault("prompt", "Q: {text}\nA:")
    kw.setdefault("target", " {label}")
    if kw.get("format", "prompt_completion") != "prompt_completion":
        kw.pop("prompt"), kw.pop("target")
    return DataSection(train=train, eval=evaluation, **kw)


# --- masks, per format ---------------------------------------------------------------------------


def test_prompt_tokens_carry_no_labels_and_target_plus_eos_does(tokenizer):
    row = TaskRow(prompt="Message: where is my order?\nIntent:", target=" track_order", source="x:1")
    example = data.training_example(tokenizer, row, chat=False)
    prompt = data.prompt_ids(tokenizer, row, chat=False)
    assert example["input_ids"][: len(prompt)] == prompt  # evaluation asks exactly what training saw
    assert labelled(tokenizer, example) == " track_order<eos>"
    assert masked(tokenizer, example) == "Message: where is my order?\nIntent:"


def test_prompt_completion_through_a_chat_template(chat_tokenizer):
    row = TaskRow(prompt="hello", target="greeting", source="x:1")
    example = data.training_example(chat_tokenizer, row, chat=True)
    prompt = data.prompt_ids(chat_tokenizer, row, chat=True)
    assert chat_tokenizer.decode(prompt) == "<|user|>hello<eos>\n<|assistant|>"
    assert example["input_ids"][: len(prompt)] == prompt
    assert labelled(chat_tokenizer, example) == "greeting<eos>"


def test_alpaca_rows_with_and_without_input(tmp_path, tokenizer):
    s = section(
        tmp_path,
        [{"instruction": "Add", "input": "2 and 3", "output": "5"}, {"instruction": "Say hi", "output": "hi"}],
        [{"instruction": "x", "output": "y"}],
        format="alpaca",
    )
    with_input, without = data.load_rows(s, "train")
    assert with_input.prompt.endswith("### Instruction:\nAdd\n\n### Input:\n2 and 3\n\n### Response:\n")
    assert "### Input" not in without.prompt and "paired with an input" not in without.prompt
    example = data.training_example(tokenizer, with_input, chat=False)
    assert labelled(tokenizer, example) == "5<eos>"
    assert masked(tokenizer, example) == with_input.prompt


def test_messages_train_every_assistant_turn_and_nothing_else(tmp_path, chat_tokenizer):
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Order 12 is late"},
        {"role": "assistant", "content": "track_order"},
    ]
    s = section(tmp_path, [{"messages": conversation}], [{"messages": conversation}], format="messages")
    row = data.load_rows(s, "train")[0]
    assert row.target == "track_order"
    example = data.training_example(chat_tokenizer, row, chat=True)
    assert labelled(chat_tokenizer, example) == "Hello!<eos>\ntrack_order<eos>\n"
    assert masked(chat_tokenizer, example) == (
        "<|system|>Be brief.<eos>\n<|user|>Hi<eos>\n<|assistant|><|user|>Order 12 is late<eos>\n<|assistant|>"
    )
    prompt = data.prompt_ids(chat_tokenizer, row, chat=True)
    assert example["input_ids"][: len(prompt)] == prompt[: len(prompt)]
    assert chat_tokenizer.decode(prompt).endswith("<|user|>Order 12 is late<eos>\n<|assistant|>")


def test_messages_rows_are_checked(tmp_path):
    bad = [{"messages": [{"role": "user", "content": "hi"}]}]
    s = section(tmp_path, bad, bad, format="messages")
    with pytest.raises(PipelineError, match=r"train.jsonl:1: the last turn must be the assistant's answer"):
        data.load_rows(s, "train")
    s = section(tmp_path, [{"messages": [{"role": "bot", "content": "x"}]}], bad, format="messages")
    with pytest.raises(PipelineError, match=r"train.jsonl:1: messages\[0\] must be \{role: system\|user\|assistant"):
        data.load_rows(s, "train")


# --- length, packing -----------------------------------------------------------------------------


def test_too_long_rows_are_dropped_or_truncated_and_counted(tmp_path, tokenizer):
    rows = [
        TaskRow(prompt="short", target=" a", source="x:1"),
        TaskRow(prompt="a much longer prompt " * 20, target=" b", source="x:2"),
    ]
    drop = data.training_examples(
        tokenizer, rows, False, DataSection(train="t", prompt="{x}", target="{y}", max_seq_len=16)
    )
    assert (len(drop.examples), drop.dropped, drop.truncated) == (1, 1, 0)
    cut = data.training_examples(
        tokenizer, rows, False, DataSection(train="t", prompt="{x}", target="{y}", max_seq_len=16, too_long="truncate")
    )
    # truncating the long row leaves only prompt tokens: nothing to learn, so it is dropped after all
    assert (len(cut.examples), cut.dropped, cut.truncated) == (1, 1, 1)
    assert all(len(ex["input_ids"]) <= 16 for ex in cut.examples)


def test_packed_rows_attend_only_within_themselves(tokenizer, tiny_models):
    model = load_model(ModelSource(str(tiny_models["base"]), None, True), torch.float32)
    rows = [TaskRow(prompt=p, target=t, source="x") for p, t in (("where is it", " track"), ("cancel now", " cancel"))]
    examples = [data.training_example(tokenizer, r, chat=False) for r in rows]
    (packed,) = data.pack(examples, max_seq_len=64)
    assert packed["position_ids"] == list(range(len(examples[0]["input_ids"]))) + list(
        range(len(examples[1]["input_ids"]))
    )
    with torch.no_grad():
        together = model(
            input_ids=torch.tensor([packed["input_ids"]]),
            position_ids=torch.tensor([packed["position_ids"]]),
            use_cache=False,
        ).logits[0]
        apart = torch.cat([model(input_ids=torch.tensor([ex["input_ids"]])).logits[0] for ex in examples])
    assert torch.allclose(together, apart, atol=1e-5)
    assert packed["labels"][len(examples[0]["input_ids"])] == IGNORE_INDEX


def test_pad_batch_masks_padding():
    batch = data.pad_batch(
        [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [5], "labels": [5]}], pad_id=0
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [5, -100, -100]]


# --- splits, leaks, sources ------------------------------------------------------------------------


def test_eval_is_carved_from_train_when_not_given_seeded_and_disjoint(tmp_path):
    rows = [{"text": f"message {i}", "label": "x"} for i in range(50)]
    s = section(tmp_path, rows, eval_fraction=0.2, split_seed=3)
    first = data.load_splits(s)
    assert (len(first.train), len(first.eval)) == (40, 10)
    assert {r.prompt for r in first.train}.isdisjoint({r.prompt for r in first.eval})
    assert [r.prompt for r in data.load_splits(s).eval] == [r.prompt for r in first.eval]
    other_seed = data.load_splits(s.model_copy(update={"split_seed": 4}))
    assert [r.prompt for r in other_seed.eval] != [r.prompt for r in first.eval]


def test_duplicates_and_overlap_are_counted_exact_and_normalized(tmp_path):
    train = [
        {"text": "Where is my order", "label": "a"},
        {"text": "where  is my ORDER", "label": "a"},
        {"text": "cancel it", "label": "b"},
    ]
    evaluation = [
        {"text": "cancel it", "label": "b"},
        {"text": "Cancel  It", "label": "b"},
        {"text": "new", "label": "c"},
    ]
    splits = data.load_splits(section(tmp_path, train, evaluation))
    assert (splits.duplicates_in_train, splits.overlap_exact, splits.overlap_normalized) == (1, 1, 2)


def test_csv_parquet_and_json_sources_with_renamed_columns(tmp_path):
    frame = pd.DataFrame({"question": ["hi there", "bye"], "intent": ["greet", "leave"]})
    frame.to_csv(tmp_path / "rows.csv", index=False)
    frame.to_parquet(tmp_path / "rows.parquet")
    (tmp_path / "rows.json").write_text(frame.to_json(orient="records"))
    for name, first_where in (
        ("rows.csv", "rows.csv:2"),
        ("rows.parquet", "rows.parquet row 1"),
        ("rows.json", "rows.json row 1"),
    ):
        s = DataSection(
            train=str(tmp_path / name),
            eval=str(tmp_path / name),
            prompt="Q: {text}",
            target="{label}",
            columns={"question": "text", "intent": "label"},
        )
        rows = data.load_rows(s, "train")
        assert [(r.prompt, r.target) for r in rows] == [("Q: hi there", "greet"), ("Q: bye", "leave")]
        assert rows[0].source.endswith(first_where)


def test_row_missing_a_template_field_names_file_line_and_field(tmp_path):
    s = section(tmp_path, [{"text": "a", "label": "b"}, {"text": "c"}], [{"text": "a", "label": "b"}])
    with pytest.raises(PipelineError, match=r"train.jsonl:2: row has no field 'label', which data.target uses"):
        data.load_rows(s, "train")


def test_malformed_json_names_the_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "a", "label": "b"}\n{"text": "c", \n')
    with pytest.raises(PipelineError, match=r"bad.jsonl:2: malformed JSON"):
        data.read_jsonl(tmp_path / "bad.jsonl")
    (tmp_path / "bad.json").write_text('[{"text": "a"},\n {"text": }]')
    with pytest.raises(PipelineError, match=r"bad.json:2: malformed JSON"):
        data.read_source(str(tmp_path / "bad.json"), DataSection(train="x", prompt="{a}", target="{b}"), "train")


def test_empty_file_and_unknown_extension(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(PipelineError, match="no rows"):
        data.read_jsonl(tmp_path / "empty.jsonl")
    (tmp_path / "rows.txt").write_text("x")
    with pytest.raises(PipelineError, match="unsupported data file type '.txt'"):
        data.read_source(str(tmp_path / "rows.txt"), DataSection(train="x", prompt="{a}", target="{b}"), "train")


def test_hub_source_failure_says_what_to_do(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'org/intents' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    s = DataSection(train="hub:org/intents@v1", eval="hub:org/intents@v1", prompt="{a}", target="{b}")
    # the Hub unreachable: retry later (exit 3), or work offline from an exported file
    with pytest.raises(RemoteError, match=r"hub:org/intents@v1: the Hub could not be reached .* export the dataset"):
        data.read_source(s.eval, s, "eval")

    def missing_split(*args, **kwargs):
        raise ValueError("Unknown split 'test'. Should be one of ['train'].")

    monkeypatch.setattr(datasets, "load_dataset", missing_split)
    with pytest.raises(
        PipelineError, match=r"hub:org/intents@v1: could not load split 'test' .* export the dataset"
    ) as e:
        data.read_source(s.eval, s, "eval")
    assert type(e.value) is PipelineError  # a recipe to fix (exit 2)


def test_fingerprint_changes_with_the_bytes_and_the_section(tmp_path):
    s = section(tmp_path, [{"text": "a", "label": "b"}], [{"text": "c", "label": "d"}])
    first = data_fingerprint(s)
    assert data_fingerprint(s) == first
    assert data_fingerprint(s.model_copy(update={"prompt": "Q2: {text}"})) != first
    write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": "c"}])
    assert data_fingerprint(s) != first


def test_text_format_trains_every_token_and_evaluates_the_second_half(tmp_path, chat_tokenizer):
    train = [{"text": "the quick brown fox jumps"}, {"text": "The  quick brown fox JUMPS"}]
    s = section(tmp_path, train, [{"text": "a b c d e"}, {"text": "the quick brown fox jumps"}], format="text")
    splits = data.load_splits(s)
    example = data.training_example(chat_tokenizer, splits.train[0], chat=True)  # never chat-wrapped
    assert labelled(chat_tokenizer, example) == "the quick brown fox jumps<eos>"
    assert (splits.eval[0].prompt, splits.eval[0].target) == ("a b", "c d e")
    assert chat_tokenizer.decode(data.prompt_ids(chat_tokenizer, splits.eval[0], chat=True)) == "a b"
    assert (splits.duplicates_in_train, splits.overlap_exact, splits.overlap_normalized) == (1, 1, 1)


def test_inspect_marks_exactly_the_trained_tokens(tokenizer):
    from pipeline.inspect_data import marked_text

    row = TaskRow(prompt="Q: hi\nA:", target=" yes", source="x:1")
    assert marked_text(tokenizer, data.training_example(tokenizer, row, chat=False)) == "Q: hi\nA:[[ yes<eos>]]"

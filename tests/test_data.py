import json

import pytest

from pipeline import data
from pipeline.data import IGNORE_INDEX, TaskRow
from pipeline.errors import PipelineError
from pipeline.models import ModelSource, load_tokenizer
from pipeline.recipe import DataSection


@pytest.fixture
def tokenizer(tiny_models):
    return load_tokenizer(ModelSource(str(tiny_models["base"]), None, True))


def labelled_text(tokenizer, example) -> str:
    return tokenizer.decode(
        [t for t, label in zip(example["input_ids"], example["labels"], strict=True) if label != IGNORE_INDEX]
    )


def test_prompt_tokens_carry_no_labels_and_target_plus_eos_does(tokenizer):
    row = TaskRow(prompt="Message: where is my order?\nIntent:", target=" track_order", source="x:1")
    example = data.training_example(tokenizer, row, chat=False)
    prompt_ids = data.prompt_token_ids(tokenizer, row.prompt, chat=False)
    assert example["input_ids"][: len(prompt_ids)] == prompt_ids
    assert example["labels"][: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    assert labelled_text(tokenizer, example) == " track_order<eos>"
    assert example["labels"][-1] == tokenizer.eos_token_id


def test_chat_template_prompt_is_the_same_in_training_and_evaluation(tokenizer):
    tokenizer.chat_template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}<|assistant|>"
    assert data.uses_chat_template(tokenizer, "auto") and not data.uses_chat_template(tokenizer, "never")
    row = TaskRow(prompt="hello", target="greeting", source="x:1")
    example = data.training_example(tokenizer, row, chat=True)
    prompt_ids = data.prompt_token_ids(tokenizer, row.prompt, chat=True)
    assert tokenizer.decode(prompt_ids) == "<|user|>hello\n<|assistant|>"
    assert example["input_ids"][: len(prompt_ids)] == prompt_ids
    assert labelled_text(tokenizer, example) == "greeting<eos>"


def test_rows_longer_than_max_seq_len_are_dropped_and_counted(tokenizer):
    rows = [TaskRow("short", " a", "x:1"), TaskRow("a much longer prompt " * 20, " b", "x:2")]
    kept, dropped = data.training_examples(tokenizer, rows, chat=False, max_seq_len=16)
    assert (len(kept), dropped) == (1, 1)


def test_pad_batch_masks_padding(tokenizer):
    batch = data.pad_batch(
        [
            {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7]},
            {"input_ids": [5], "attention_mask": [1], "labels": [5]},
        ],
        pad_id=0,
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [5, -100, -100]]


def section(tmp_path, train_text: str, **kw) -> DataSection:
    (tmp_path / "train.jsonl").write_text(train_text)
    (tmp_path / "eval.jsonl").write_text(json.dumps({"text": "t", "label": "l"}) + "\n")
    return DataSection(
        train=tmp_path / "train.jsonl", eval=tmp_path / "eval.jsonl", prompt="{text}", target="{label}", **kw
    )


def test_row_missing_a_template_field_names_file_line_and_field(tmp_path):
    s = section(tmp_path, '{"text": "a", "label": "b"}\n\n{"text": "c"}\n')
    with pytest.raises(PipelineError, match=r"train.jsonl:3: row has no field 'label', which data.target uses"):
        data.load_rows(s, "train")


def test_malformed_json_names_the_line(tmp_path):
    s = section(tmp_path, '{"text": "a", "label": "b"}\n{"text": "c", \n')
    with pytest.raises(PipelineError, match=r"train.jsonl:2: malformed JSON"):
        data.load_rows(s, "train")


def test_empty_file_and_unknown_extension(tmp_path):
    with pytest.raises(PipelineError, match="no rows"):
        data.load_rows(section(tmp_path, ""), "train")
    (tmp_path / "rows.txt").write_text("x")
    with pytest.raises(PipelineError, match="unsupported data file type '.txt'"):
        data.read_jsonl(tmp_path / "rows.txt")


def test_fingerprint_changes_with_the_bytes_and_the_section(tmp_path):
    s = section(tmp_path, '{"text": "a", "label": "b"}\n')
    first = data.data_fingerprint(s)
    assert data.data_fingerprint(s) == first
    assert data.data_fingerprint(s.model_copy(update={"prompt": "Q: {text}"})) != first
    (tmp_path / "train.jsonl").write_text('{"text": "a", "label": "c"}\n')
    assert data.data_fingerprint(s) != first

"""Batched generation computes each row as it would be computed alone: left padding, rows grouped by length,
and the prompt prefix a batch shares computed once for the batch."""

import pytest
import torch

from pipeline import models
from pipeline.runtimes import transformers as runtime

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tiny(tiny_models):
    source = models.ModelSource(str(tiny_models["base"]), None, True)
    torch.manual_seed(0)
    return models.load_model(source, torch.float32).eval(), models.load_tokenizer(source)


def _answers(model, tokenizer, prompts, batch_size, confidence=True):
    found = {}
    for batch in runtime.generate_batches(
        model, tokenizer, prompts, list(range(len(prompts))), 6, batch_size, progress=False, confidence=confidence
    ):
        found.update((e["row"], e) for e in batch)
    return [found[i] for i in range(len(prompts))]


def test_the_shared_prefix_is_what_every_prompt_begins_with_leaving_each_a_token(tiny):
    model, _ = tiny
    assert runtime.shared_prefix_length(model, [[5, 6, 7, 8, 9, 1], [5, 6, 7, 8, 9, 2, 3]]) == 5
    assert runtime.shared_prefix_length(model, [[5, 6, 7, 8, 9], [5, 6, 7, 8, 9, 2]]) == 4  # one token left to each
    assert runtime.shared_prefix_length(model, [[5, 6, 7, 1], [5, 6, 7, 2]]) == 0  # too short to pay
    assert runtime.shared_prefix_length(model, [[5, 6, 7, 8, 9, 1]]) == 0  # one row: nothing to share


def test_a_batch_with_a_shared_prefix_answers_as_each_row_alone(tiny, monkeypatch):
    model, tokenizer = tiny
    instructions = tokenizer("Classify the message into its intent. Message:")["input_ids"]
    texts = ["where is my order", "cancel it please", "i want a refund now", "hello", "change my address to rome"]
    prompts = [instructions + tokenizer(f" {t}\nIntent:", add_special_tokens=False)["input_ids"] for t in texts]
    assert runtime.shared_prefix_length(model, prompts) >= len(instructions)
    alone = _answers(model, tokenizer, prompts, batch_size=1)
    together = _answers(model, tokenizer, prompts, batch_size=8)
    monkeypatch.setattr(runtime, "MIN_SHARED_PREFIX", 10_000)  # the same batch, every prompt computed whole
    whole = _answers(model, tokenizer, prompts, batch_size=8)
    for a, b, c in zip(alone, together, whole, strict=True):
        assert a["prediction"] == b["prediction"] == c["prediction"]
        assert a["generated_tokens"] == b["generated_tokens"] and a["stopped"] == b["stopped"]
        assert b["confidence"] == pytest.approx(a["confidence"], rel=1e-4)

"""Fidelity: does each artifact answer like the model it was made from? Checked where conversions break.

- merge: base + adapter against the merged checkpoint, logits on a sample of eval rows (prompt, answer
  and end token, teacher-forced). A merge that changes answers is an error.
- export: each GGUF file against the merged model on the same tokens: top-1 agreement and the mean
  negative log-likelihood of each (NLL alone hides damage: a 4-bit file can match fp32's NLL while
  disagreeing on a quarter of its top-1 tokens).
- template and tokens: llama.cpp's tokenization of every eval prompt text against the token ids the
  training/eval tokenizer gives, and the file's end token against the one the specialist learned to end with.
"""

from __future__ import annotations

import torch

from pipeline import data
from pipeline.runtimes import Prompt

SAMPLE_ROWS = 16  # eval rows whose every position is compared
MAX_SAMPLE_TOKENS = 128  # long rows are cut here: the comparison is per position, a long tail adds little
MERGE_MIN_TOP1 = 0.99  # float32 merges agree exactly; below this the merged file is not the trained model


def sample_sequences(tokenizer, rows: list[data.TaskRow], chat: bool) -> list[list[int]]:
    """Token ids of up to SAMPLE_ROWS eval rows spread over the file, each prompt + answer + end token."""
    step = max(1, len(rows) // SAMPLE_ROWS)
    picked = rows[::step][:SAMPLE_ROWS]
    return [data.training_example(tokenizer, row, chat)["input_ids"][:MAX_SAMPLE_TOKENS] for row in picked]


def logits(model, sequences: list[list[int]]) -> list[torch.Tensor]:
    """float32 logits on CPU for every position of every sequence."""
    device = next(model.parameters()).device
    with torch.inference_mode():
        return [model(input_ids=torch.tensor([ids], device=device)).logits[0].float().cpu() for ids in sequences]


def compare_logits(reference: list[torch.Tensor], other: list[torch.Tensor]) -> dict:
    """Top-1 agreement and the largest logit difference over every position of the sample."""
    positions = agree = 0
    max_diff = 0.0
    for ref, oth in zip(reference, other, strict=True):
        agree += int((ref.argmax(-1) == oth.argmax(-1)).sum())
        positions += ref.shape[0]
        max_diff = max(max_diff, float((ref - oth).abs().max()))
    return {
        "rows": len(reference),
        "positions": positions,
        "top1_agreement": agree / positions,
        "max_abs_logit_diff": max_diff,
    }


def compare_export(merged: list[torch.Tensor], sequences: list[list[int]], gguf: dict) -> dict:
    """A GGUF's top-1 tokens and NLL (from runtimes.llamacpp.inspect_gguf) against the merged model's."""
    positions = agree = 0
    nll_merged = nll_gguf = 0.0
    for logits_m, ids, top1, nll in zip(merged, sequences, gguf["top1"], gguf["nll"], strict=True):
        n = len(ids) - 1  # positions that predict a next token
        agree += int((logits_m[:n].argmax(-1) == torch.tensor(top1)).sum())
        nll_merged += float(torch.nn.functional.cross_entropy(logits_m[:n], torch.tensor(ids[1:]), reduction="sum"))
        nll_gguf += sum(nll)
        positions += n
    return {
        "rows": len(sequences),
        "positions": positions,
        "top1_agreement": agree / positions,
        "nll": nll_gguf / positions,
        "nll_merged": nll_merged / positions,
    }


def token_parity(prompts: list[Prompt], llama_ids: list[list[int]], tokenizer) -> dict:
    """Whether llama.cpp tokenizes each eval prompt text to the ids training and evaluation used."""
    mismatched = [i for i, (p, ids) in enumerate(zip(prompts, llama_ids, strict=True)) if p.ids != ids]
    parity = {"prompts": len(prompts), "identical": len(prompts) - len(mismatched), "mismatched_rows": mismatched[:20]}
    if mismatched:
        i = mismatched[0]
        parity["first_mismatch"] = {
            "row": i,
            "text": prompts[i].text[:300],
            "expected": tokenizer.convert_ids_to_tokens(prompts[i].ids)[:40],
            "llama_cpp": tokenizer.convert_ids_to_tokens(llama_ids[i])[:40],
        }
    return parity

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


def sample_sequences(tokenizer, rows: list[data.TaskRow], chat: bool) -> tuple[list[list[int]], list[list[int]]]:
    """Up to SAMPLE_ROWS eval rows spread over the file: each one's token ids (prompt + answer + end token),
    and the positions whose next token is part of the answer (what the specialist was trained to predict)."""
    step = max(1, len(rows) // SAMPLE_ROWS)
    sequences, answer_positions = [], []
    for row in rows[::step][:SAMPLE_ROWS]:
        example = data.training_example(tokenizer, row, chat)
        labels = example["labels"][:MAX_SAMPLE_TOKENS]
        sequences.append(example["input_ids"][:MAX_SAMPLE_TOKENS])
        answer_positions.append([i - 1 for i in range(1, len(labels)) if labels[i] != data.IGNORE_INDEX])
    return sequences, answer_positions


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


def compare_export(
    merged: list[torch.Tensor], sequences: list[list[int]], answer_positions: list[list[int]], gguf: dict
) -> dict:
    """A GGUF's top-1 tokens and NLL (from runtimes.llamacpp.inspect_gguf) against the merged model's: over
    every position, and over the answer positions alone (a specialist's prompt positions matter less: it was
    never trained to predict them)."""
    totals = {"all": [0, 0, 0.0, 0.0], "answer": [0, 0, 0.0, 0.0]}  # positions, agree, NLL gguf, NLL merged
    for logits_m, ids, answer, top1, nll in zip(
        merged, sequences, answer_positions, gguf["top1"], gguf["nll"], strict=True
    ):
        n = len(ids) - 1  # positions that predict a next token
        agree = (logits_m[:n].argmax(-1) == torch.tensor(top1)).tolist()
        nll_m = torch.nn.functional.cross_entropy(logits_m[:n], torch.tensor(ids[1:]), reduction="none").tolist()
        for name, picked in (("all", range(n)), ("answer", answer)):
            total = totals[name]
            total[0] += len(picked)
            total[1] += sum(agree[i] for i in picked)
            total[2] += sum(nll[i] for i in picked)
            total[3] += sum(nll_m[i] for i in picked)
    found = {"rows": len(sequences)}
    for name, (positions, agree, nll_g, nll_m) in totals.items():
        prefix = "" if name == "all" else "answer_"
        found[f"{prefix}positions"] = positions
        found[f"{prefix}top1_agreement"] = agree / positions if positions else None
        found[f"{prefix}nll"] = nll_g / positions if positions else None
        found[f"{prefix}nll_merged"] = nll_m / positions if positions else None
    return found


def compare_top1(first: list[list[int]], second: list[list[int]], answer_positions: list[list[int]]) -> dict:
    """Two llama.cpp files' top-1 tokens on the same sequences (inspect_gguf's `top1`), over every position and
    over the answer positions: e.g. an adapter on the base GGUF against the merged GGUF of the same type."""
    counts = {"all": [0, 0], "answer": [0, 0]}
    for a, b, answer in zip(first, second, answer_positions, strict=True):
        for name, picked in (("all", range(len(a))), ("answer", answer)):
            counts[name][0] += len(picked)
            counts[name][1] += sum(a[i] == b[i] for i in picked)
    return {
        "positions": counts["all"][0],
        "top1_agreement": counts["all"][1] / counts["all"][0] if counts["all"][0] else None,
        "answer_positions": counts["answer"][0],
        "answer_top1_agreement": counts["answer"][1] / counts["answer"][0] if counts["answer"][0] else None,
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

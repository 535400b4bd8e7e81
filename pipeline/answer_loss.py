"""The cross-entropy of the answer tokens alone, computing logits only where an answer token is predicted.

Only answer tokens (and the end token) carry labels, so the vocabulary projection at every prompt position
would be computed and thrown away: for a small model with a large vocabulary (SmolLM2: 49k x 576, a fifth
of its weights) that projection and its softmax are a large share of a forward pass. Batches are
left-padded, so the answers share the last few columns; the model is asked for the logits of the columns
where some row predicts a labelled token (`logits_to_keep`, through its own forward). The train stage's
loss and the validation passes' loss are both this one.

A left-padded batch pads every row to its longest: `length_groups` splits a batch's rows into groups of like
length, each cut to its own longest row, whose summed losses are the batch's loss (the same rows, the same
labelled tokens, each row computed as alone): the step learns what the whole batch's step learns, to float
rounding, and computes less padding wherever the batch's lengths differ. A group costs a forward and backward
of its own (about OVERHEAD_TOKENS tokens' worth of fixed work on a CPU), so rows are split only where that pays.
"""

from __future__ import annotations

import inspect

import torch

from pipeline.data import IGNORE_INDEX

OVERHEAD_TOKENS = 64  # a group's fixed cost, in padded tokens: measured on SmolLM2 steps, 2 CPU cores


def accepts_logits_to_keep(model) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def answer_loss_sum(model, features: dict, labels: torch.Tensor, keeps_logits: bool):
    """(summed cross-entropy over the labelled tokens, the model's outputs); position t predicts token t + 1."""
    logits, kept, outputs = _answer_logits(model, features, labels, keeps_logits)
    return _summed_loss(logits, kept), outputs


def answer_loss_and_matches(model, features: dict, labels: torch.Tensor, keeps_logits: bool):
    """(summed answer loss, per row whether the most likely token is the label at every labelled position):
    where it is, greedy decoding from the prompt would answer exactly the labelled tokens."""
    logits, kept, _ = _answer_logits(model, features, labels, keeps_logits)
    matches = ((logits.argmax(dim=-1) == kept) | (kept == IGNORE_INDEX)).all(dim=1)
    return _summed_loss(logits, kept), matches


def _answer_logits(model, features: dict, labels: torch.Tensor, keeps_logits: bool):
    targets = labels[:, 1:]
    if keeps_logits:
        columns = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
        outputs = model(**features, logits_to_keep=columns)
        return outputs.logits, targets[:, columns], outputs
    outputs = model(**features)  # an architecture without logits_to_keep (remote code, older models): every position
    return outputs.logits[:, :-1], targets, outputs


def _summed_loss(logits: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), kept.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def length_groups(lengths: list[int], overhead_tokens: int) -> list[list[int]]:
    """The rows (indices into lengths) in groups of like length that minimize the tokens computed: each group
    padded to its longest row, plus overhead_tokens per group (an exact partition of the rows sorted by length)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    ordered = [lengths[i] for i in order]
    cost = [0.0] + [float("inf")] * len(order)
    start = [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        for first in range(end):  # the group ordered[first:end], padded to ordered[first] (the longest)
            candidate = cost[first] + (end - first) * ordered[first] + overhead_tokens
            if candidate < cost[end]:
                cost[end], start[end] = candidate, first
    groups, end = [], len(order)
    while end:
        groups.append(order[start[end] : end])
        end = start[end]
    return groups[::-1]


def grouped_answer_loss_sum(model, features: dict, labels: torch.Tensor, keeps_logits: bool) -> torch.Tensor:
    """answer_loss_sum of a left-padded batch computed in length_groups, each group cut to its longest row."""
    lengths = features["attention_mask"].sum(dim=1).tolist()
    groups = length_groups(lengths, OVERHEAD_TOKENS)
    if len(groups) == 1:
        return answer_loss_sum(model, features, labels, keeps_logits)[0]
    total = 0
    for rows in groups:
        width = max(lengths[i] for i in rows)
        index = torch.tensor(rows, device=labels.device)
        group = {key: value[index, -width:] for key, value in features.items()}
        total = total + answer_loss_sum(model, group, labels[index, -width:], keeps_logits)[0]
    return total

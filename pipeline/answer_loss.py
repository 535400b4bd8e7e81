"""The cross-entropy of the answer tokens alone, computing logits only where an answer token is predicted.

Only answer tokens (and the end token) carry labels, so the vocabulary projection at every prompt position
would be computed and thrown away: for a small model with a large vocabulary (SmolLM2: 49k x 576, a fifth
of its weights) that projection and its softmax are a large share of a forward pass. Batches are
left-padded, so the answers share the last few columns; the model is asked for the logits of the columns
where some row predicts a labelled token (`logits_to_keep`, through its own forward). The train stage's
loss and the validation passes' loss are both this one.
"""

from __future__ import annotations

import inspect

import torch

from pipeline.data import IGNORE_INDEX


def accepts_logits_to_keep(model) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def answer_loss_sum(model, features: dict, labels: torch.Tensor, keeps_logits: bool):
    """(summed cross-entropy over the labelled tokens, the model's outputs); position t predicts token t + 1."""
    targets = labels[:, 1:]
    if keeps_logits:
        columns = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
        outputs = model(**features, logits_to_keep=columns)
        logits, kept = outputs.logits, targets[:, columns]
    else:  # an architecture without logits_to_keep (remote code, older models): every position
        outputs = model(**features)
        logits, kept = outputs.logits[:, :-1], targets
    loss = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), kept.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss, outputs

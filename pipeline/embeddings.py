"""Sentence embeddings for the checks on teacher-written rows: a small encoder (by default the packaged
all-MiniLM-L6-v2), mean-pooled over each text's tokens and scaled to length 1, as sentence-transformers pools it.

Runs in this process on the CPU threads torch has: the encoder is 22.7M parameters, a few hundred rows a second.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline import models
from pipeline.errors import PipelineError


class Encoder:
    def __init__(self, reference: str, field: str):
        from transformers import AutoModel, AutoTokenizer

        source = models.resolve_encoder(reference, field)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source.location, revision=source.revision)
            self.model = AutoModel.from_pretrained(source.location, revision=source.revision).eval()
        except (OSError, ValueError) as error:
            raise PipelineError(
                f"{field}: {reference} does not load as an encoder ({str(error).splitlines()[0][:200]}); give a "
                "sentence encoder's folder (e.g. all-MiniLM-L6-v2) or packaged:all-minilm-l6-v2"
            ) from None
        self.fingerprint = source.fingerprint

    def embed(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """One unit vector per text (an empty list gives an empty 0-row matrix)."""
        vectors = []
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                batch = self.tokenizer(
                    texts[start : start + batch_size],
                    padding=True,
                    truncation=True,
                    max_length=256,
                    return_tensors="pt",
                )
                hidden = self.model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
                vectors.append(torch.nn.functional.normalize(pooled, dim=-1).float().numpy())
        return np.concatenate(vectors) if vectors else np.zeros((0, 1), dtype=np.float32)

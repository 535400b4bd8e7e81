"""Checks on rows a teacher wrote, before a step trains on them (no I/O; the caller embeds the texts).

Each check returns what it kept and, per dropped row, why: exact duplicates after normalizing case and whitespace
(among the new rows and against the seed rows), near-duplicates by cosine similarity of sentence embeddings
(among the new rows and against the seeds), and contamination (a new row equal or near-equal to an eval or
validation row: training on it would inflate the score the report is judged by). Then what the kept set looks
like: rows per label, lengths against the seeds' and the eval rows', distinct n-grams, and each row's nearest
neighbour's similarity within the set and to the seeds.
"""

from __future__ import annotations

import re
import statistics
from collections import Counter
from dataclasses import dataclass, field

import numpy as np


def normalized(text: str) -> str:
    """The text as the duplicate check compares it: lowercased, whitespace collapsed (as data.TaskRow.dedup_key)."""
    return re.sub(r"\s+", " ", text).strip().lower()


@dataclass
class Verdicts:
    """Per new row: kept, or the reason it was dropped and the row it was too close to."""

    kept: list[int] = field(default_factory=list)
    dropped: dict[int, dict] = field(default_factory=dict)

    def drop(self, row: int, reason: str, **why) -> None:
        self.dropped[row] = {"reason": reason, **why}

    def counts(self) -> dict[str, int]:
        return dict(Counter(d["reason"] for d in self.dropped.values()))


def unit_rows(vectors) -> np.ndarray:
    """Rows scaled to length 1, so a dot product is the cosine similarity (a zero row stays zero)."""
    matrix = np.asarray(vectors, dtype=np.float32)
    if matrix.ndim != 2:
        matrix = matrix.reshape(len(matrix), -1)
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.where(norms == 0, 1, norms)


def check_rows(
    texts: list[str],
    seeds: list[str],
    held_out: list[str],
    embed,
    near: float | None,
) -> Verdicts:
    """Which new rows (texts) to keep, in order: the first of two near-equal rows is kept, the later dropped.

    seeds: the rows the teacher was shown (a copy of one teaches nothing new); held_out: the eval and validation
    rows (a copy of one would be scored as learned). embed(list of texts) returns one vector per text; near: the
    cosine similarity at or above which two rows count as the same (None: exact duplicates only).
    """
    verdicts = Verdicts()
    seen_seed = {normalized(t): i for i, t in enumerate(seeds)}
    seen_held = {normalized(t): i for i, t in enumerate(held_out)}
    embeddings = unit_rows(embed(list(texts))) if near is not None and texts else None
    seed_vectors = unit_rows(embed(list(seeds))) if near is not None and seeds else None
    held_vectors = unit_rows(embed(list(held_out))) if near is not None and held_out else None
    first_of: dict[str, int] = {}
    for row, text in enumerate(texts):
        key = normalized(text)
        if not key:
            verdicts.drop(row, "empty")
            continue
        if key in seen_held:
            verdicts.drop(row, "contamination", held_out_row=seen_held[key], similarity=1.0)
            continue
        if key in seen_seed:
            verdicts.drop(row, "copy_of_seed", seed_row=seen_seed[key], similarity=1.0)
            continue
        if key in first_of:
            verdicts.drop(row, "duplicate", of_row=first_of[key], similarity=1.0)
            continue
        if embeddings is not None:
            kept = embeddings[verdicts.kept] if verdicts.kept else None
            close = None
            # the order of the exact checks: an eval row's copy is contamination even where it copies a seed too
            for reason, against, name, rows in (
                ("contamination", held_vectors, "held_out_row", None),
                ("copy_of_seed", seed_vectors, "seed_row", None),
                ("near_duplicate", kept, "of_row", verdicts.kept),
            ):
                found = _nearest(against, embeddings[row], near)
                if found is not None:
                    close = (reason, name, rows[found[0]] if rows else found[0], found[1])
                    break
            if close is not None:
                reason, name, other, similarity = close
                verdicts.drop(row, reason, **{name: other, "similarity": similarity})
                continue
        first_of[key] = row
        verdicts.kept.append(row)
    return verdicts


def _nearest(vectors, vector, near: float) -> tuple[int, float] | None:
    """(row, similarity) of the row of `vectors` most similar to `vector`, where it is at least `near`."""
    if vectors is None:
        return None
    sims = vectors @ vector
    best = int(np.argmax(sims))
    return (best, round(float(sims[best]), 4)) if sims[best] >= near else None


def distinct_ngrams(texts: list[str], n: int) -> float | None:
    """Distinct word n-grams over all n-grams of the texts (distinct-n): 1.0 when no phrase repeats."""
    grams = [
        tuple(words[i : i + n]) for words in (normalized(t).split() for t in texts) for i in range(len(words) - n + 1)
    ]
    return len(set(grams)) / len(grams) if grams else None


def nearest_similarity(vectors, others=None) -> list[float]:
    """Each row's cosine similarity to its nearest neighbour: among the rows themselves (others None), or in others."""
    rows = unit_rows(vectors)
    if others is None:
        if len(rows) < 2:
            return []
        sims = rows @ rows.T
        np.fill_diagonal(sims, -np.inf)
    else:
        sims = rows @ unit_rows(others).T
    return [round(float(s), 4) for s in sims.max(axis=1)]


def length_summary(texts: list[str]) -> dict | None:
    """Words per row: median, 5th and 95th percentile, so a teacher that writes longer or shorter rows than the
    task's traffic shows."""
    if not texts:
        return None
    words = sorted(len(t.split()) for t in texts)
    pick = lambda q: words[min(len(words) - 1, int(q * (len(words) - 1) + 0.5))]  # noqa: E731
    return {"rows": len(words), "p05": pick(0.05), "p50": statistics.median(words), "p95": pick(0.95)}


def balance(labels: list[str], asked: dict[str, int]) -> dict[str, dict]:
    """Per label: rows asked for and rows kept, so a label the checks thinned shows."""
    kept = Counter(labels)
    return {label: {"asked": count, "kept": kept.get(label, 0)} for label, count in asked.items()}

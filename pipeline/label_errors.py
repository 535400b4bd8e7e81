"""Error analysis for label tasks: per label precision, recall, F1 and support for one candidate's answers, and
the confusions (expected label answered as another) that cost the most rows. No I/O; the report stage calls it.
Labels compare as the metrics do (stripped; case-folded with evaluate.ignore_case)."""

from __future__ import annotations

from collections import Counter

from pipeline.metrics import normalize


def per_label(predictions: list[str], references: list[str], ignore_case: bool = False) -> dict[str, dict]:
    """{label: {precision, recall, f1, support, predicted}} over the reference labels (precision None where the
    label was never answered)."""
    preds = [normalize(p, ignore_case) for p in predictions]
    refs = [normalize(r, ignore_case) for r in references]
    found = {}
    for label in sorted(set(refs)):
        tp = sum(p == label and r == label for p, r in zip(preds, refs, strict=True))
        predicted = sum(p == label for p in preds)
        support = sum(r == label for r in refs)
        found[label] = {
            "precision": tp / predicted if predicted else None,
            "recall": tp / support,
            "f1": 2 * tp / (predicted + support),
            "support": support,
            "predicted": predicted,
        }
    return found


def confusions(predictions: list[str], references: list[str], ignore_case: bool = False, top: int | None = None):
    """The (expected, answered) pairs of wrong answers, most rows first: what the candidate mistakes for what."""
    pairs = Counter(
        (normalize(r, ignore_case), normalize(p, ignore_case))
        for p, r in zip(predictions, references, strict=True)
        if normalize(p, ignore_case) != normalize(r, ignore_case)
    )
    return [{"expected": e, "answered": a, "rows": n} for (e, a), n in pairs.most_common(top)]


def analysis(texts: dict[str, tuple[list[str], list[str]]], train_targets: list[str], ignore_case: bool) -> dict:
    """Per candidate its per-label scores and top confusions, with each label's training rows beside them."""
    train = Counter(normalize(t, ignore_case) for t in train_targets)
    return {
        "train_rows": dict(sorted(train.items())),
        "candidates": {
            name: {
                "per_label": per_label(predictions, references, ignore_case),
                "confusions": confusions(predictions, references, ignore_case),
            }
            for name, (predictions, references) in texts.items()
        },
    }

"""Error analysis: where a candidate's answers go wrong, beyond its mean score. No I/O; the report stage calls it.

Label tasks: per label precision, recall, F1 and support, and the confusions (expected label answered as another)
that cost the most rows, beside the training rows each label had. Every task: how long the answers are against
the expected ones, how many generation cut off at max_new_tokens, and for JSON targets which answers do not
parse. Labels compare as the metrics do (stripped; case-folded with evaluate.ignore_case)."""

from __future__ import annotations

import statistics
from collections import Counter

from pipeline.metrics import normalize, parse_json_object

# metrics that read answers as JSON objects: a task scored by one is a JSON task
JSON_METRICS = ("json_match", "json_top_level")
LENGTH_BINS = 24


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


def label_analysis(texts: dict[str, tuple[list[str], list[str]]], train_targets: list[str], ignore_case: bool) -> dict:
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


def is_json_task(metrics: list[str], references: list[str]) -> bool:
    """Scored by a JSON metric, or every expected answer is a JSON object."""
    return any(m in JSON_METRICS for m in metrics) or (
        bool(references) and all(parse_json_object(r) is not None for r in references)
    )


def distribution(values: list[float]) -> dict | None:
    """mean, p50, p95 and max of a list of lengths (None for an empty list)."""
    if not values:
        return None
    ordered = sorted(values)
    return {
        "mean": statistics.fmean(ordered),
        "p50": statistics.median(ordered),
        "p95": ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))],
        "max": ordered[-1],
    }


def answer_analysis(
    generations: dict[str, list[dict]], references: list[str], json_task: bool, examples: int = 5
) -> dict:
    """Per candidate: its answers' lengths in characters (the unit every candidate shares; tokenizers differ)
    against the expected answers', its generated tokens, the rows generation cut off at max_new_tokens
    (it did not reach its end token), the empty answers and, for a JSON task, the answers that are not a JSON
    object (how many of them were cut off, and the first few). A histogram of the lengths on bins shared by
    every candidate and the expected answers, for the page's chart. Row numbers index the eval rows."""
    expected = [len(r.strip()) for r in references]
    answers = {name: [g["prediction"].strip() for g in gens] for name, gens in generations.items()}
    longest = max([*expected, *(len(a) for texts in answers.values() for a in texts)], default=0)
    width = max(1, -(-(longest + 1) // LENGTH_BINS))  # ceil: every length falls in a bin
    edges = [i * width for i in range(LENGTH_BINS + 1)]

    def histogram(lengths: list[int]) -> list[int]:
        counts = Counter(min(n // width, LENGTH_BINS - 1) for n in lengths)
        return [counts.get(i, 0) for i in range(LENGTH_BINS)]

    found = {
        "json_task": json_task,
        "rows": len(references),
        "length_bin_edges_chars": edges,
        "expected": {"chars": distribution(expected), "histogram": histogram(expected)},
        "candidates": {},
    }
    for name, gens in generations.items():
        texts = answers[name]
        lengths = [len(a) for a in texts]
        tokens = [g["generated_tokens"] for g in gens if g.get("generated_tokens") is not None]
        cut = [i for i, g in enumerate(gens) if g.get("stopped") is False]
        ratios = [len(a) / n for a, n in zip(texts, expected, strict=True) if n]
        facts = {
            "chars": distribution(lengths),
            "histogram": histogram(lengths),
            "generated_tokens": distribution(tokens) if len(tokens) == len(gens) else None,
            "median_length_ratio": statistics.median(ratios) if ratios else None,
            "empty_rows": sum(not a for a in texts),
            "cut_off": {"count": len(cut), "share": len(cut) / len(gens) if gens else 0.0, "rows": cut},
        }
        if json_task:
            invalid = [i for i, a in enumerate(texts) if parse_json_object(a) is None]
            facts["invalid_json"] = {
                "count": len(invalid),
                "share": len(invalid) / len(gens) if gens else 0.0,
                "cut_off": len(set(invalid) & set(cut)),
                "rows": invalid,
                "examples": [{"row": i, "answer": texts[i][:160], "cut_off": i in cut} for i in invalid[:examples]],
            }
        found["candidates"][name] = facts
    return found

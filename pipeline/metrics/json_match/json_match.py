"""JSON field match, inside the object: for structured extraction. Each reference is a JSON object; both it
and the prediction (parsed as a JSON object; nothing if it does not parse) are flattened into fields by path
(`slots.city`; a list's items as a multiset under `path[]`, so their order does not count; an empty object or
list is a field of its own). A row scores the F1 of its fields: fields with equal path and value over the
fields of both, so a missing field costs recall and an extra predicted one costs precision (1.0 for two empty
objects). Also returns json_valid (predictions that parse as an object), exact_object (rows with every field
right and none extra: the whole object, list order aside), field precision / recall / F1 over all rows, and
per field path the same with its support. json_top_level keeps the earlier top-level-keys score."""

import json
from collections import Counter

from pipeline import metrics
from pipeline.metrics import mean
from pipeline.metrics import parse_json_object as parse_object


def fields(value, path: str = "") -> Counter:
    """(path, canonical JSON of the value) for every leaf: objects by key, lists as multisets of their items."""
    found: Counter = Counter()
    if isinstance(value, dict) and value:
        for key, inner in value.items():
            found += fields(inner, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list) and value:
        for item in value:
            found += fields(item, f"{path}[]")
    else:
        found[(path, json.dumps(value, sort_keys=True))] += 1
    return found


def reference_fields(reference: str) -> Counter:
    expected = parse_object(reference)
    if expected is None:
        raise ValueError(f"json_match: the reference is not a JSON object: {reference[:80]!r}")
    return fields(expected) if expected else Counter()


def predicted_fields(prediction: str) -> Counter | None:
    got = parse_object(prediction)
    return None if got is None else (fields(got) if got else Counter())


def row_f1(expected: Counter, got: Counter | None) -> float:
    if got is None:
        return 0.0
    if not expected and not got:
        return 1.0
    matched = sum((expected & got).values())
    return 2 * matched / (sum(expected.values()) + sum(got.values()))


def _ratio(a: int, b: int) -> float | None:
    return a / b if b else None


def field_scores(predictions: list[str], references: list[str]) -> dict:
    """Precision, recall and F1 over every field of every row, overall and per path (support: expected count)."""
    per_path: dict[str, Counter] = {}
    totals = Counter()
    for prediction, reference in zip(predictions, references, strict=True):
        expected, got = reference_fields(reference), predicted_fields(prediction) or Counter()
        matched = expected & got
        for counter, kind in ((expected, "expected"), (got, "predicted"), (matched, "matched")):
            for (path, _), count in counter.items():
                per_path.setdefault(path, Counter())[kind] += count
                totals[kind] += count

    def prf(c: Counter) -> dict:
        precision, recall = _ratio(c["matched"], c["predicted"]), _ratio(c["matched"], c["expected"])
        f1 = _ratio(2 * c["matched"], c["expected"] + c["predicted"])
        return {"precision": precision, "recall": recall, "f1": f1, "support": c["expected"]}

    return {"overall": prf(totals), "per_field": {path: prf(c) for path, c in sorted(per_path.items())}}


class JsonMatch(metrics.RowMetric):
    NAME = "json_match"
    DESCRIPTION = __doc__

    @staticmethod
    def row_score(prediction, reference, ignore_case):
        return row_f1(reference_fields(reference), predicted_fields(prediction))

    def _compute(self, predictions, references, ignore_case=False):
        out = super()._compute(predictions, references, ignore_case)
        parsed = [parse_object(p) for p in predictions]
        out["json_valid"] = mean([float(p is not None) for p in parsed])
        out["exact_object"] = mean([float(score == 1.0) for score in out["per_row"]])  # every field, none extra
        scores = field_scores(predictions, references)
        out["field_precision"] = scores["overall"]["precision"]
        out["field_recall"] = scores["overall"]["recall"]
        out["field_f1"] = scores["overall"]["f1"]
        out["per_field"] = scores["per_field"]
        return out

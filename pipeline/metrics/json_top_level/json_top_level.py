"""JSON top-level match (what json_match scored before it looked inside objects): each reference is a JSON
object; a row scores the share of its top-level keys that the prediction, parsed as a JSON object, has with
equal values (0 if the prediction is not valid JSON; a nested object counts as one value, extra predicted keys
cost nothing). Also returns json_valid, the share of predictions that parse as a JSON object."""

from pipeline import metrics
from pipeline.metrics import mean
from pipeline.metrics import parse_json_object as parse_object


def field_match(prediction: str, reference: str) -> float:
    expected = parse_object(reference)
    if expected is None:
        raise ValueError(f"json_top_level: the reference is not a JSON object: {reference[:80]!r}")
    got = parse_object(prediction)
    if got is None:
        return 0.0
    if not expected:
        return float(not got)
    return sum(key in got and got[key] == value for key, value in expected.items()) / len(expected)


class JsonTopLevel(metrics.RowMetric):
    NAME = "json_top_level"
    DESCRIPTION = __doc__

    @staticmethod
    def row_score(prediction, reference, ignore_case):
        return field_match(prediction, reference)

    def _compute(self, predictions, references, ignore_case=False):
        out = super()._compute(predictions, references, ignore_case)
        out["json_valid"] = mean([float(parse_object(p) is not None) for p in predictions])
        return out

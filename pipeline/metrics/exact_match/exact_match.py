"""Exact match: 1 where the prediction equals the reference after stripping surrounding whitespace."""

from pipeline import metrics
from pipeline.metrics import normalize


class ExactMatch(metrics.RowMetric):
    NAME = "exact_match"
    DESCRIPTION = __doc__

    @staticmethod
    def row_score(prediction, reference, ignore_case):
        return normalize(prediction, ignore_case) == normalize(reference, ignore_case)

"""Exact match: 1 where the prediction equals the reference after stripping surrounding whitespace."""

from pipeline import metrics
from pipeline.metrics import mean, normalize


class ExactMatch(metrics.RowMetric):
    NAME = "exact_match"
    DESCRIPTION = __doc__

    @staticmethod
    def score(predictions, references, ignore_case=False):
        per_row = [
            float(normalize(p, ignore_case) == normalize(r, ignore_case))
            for p, r in zip(predictions, references, strict=True)
        ]
        return mean(per_row), per_row

"""Label accuracy: like exact match, but forgiving of what a classifier's answer carries around the label:
case, surrounding quotes and backticks, and trailing punctuation."""

from pipeline import metrics
from pipeline.metrics import mean


def label(text: str) -> str:
    return text.strip().strip("`'\".!?,;: ").lower()


class Accuracy(metrics.RowMetric):
    NAME = "accuracy"
    DESCRIPTION = __doc__

    @staticmethod
    def score(predictions, references, ignore_case=True):
        per_row = [float(label(p) == label(r)) for p, r in zip(predictions, references, strict=True)]
        return mean(per_row), per_row

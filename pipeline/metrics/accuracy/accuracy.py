"""Label accuracy: like exact match, but forgiving of what a classifier's answer carries around the label:
case, surrounding quotes and backticks, and trailing punctuation."""

from pipeline import metrics


def label(text: str) -> str:
    return text.strip().strip("`'\".!?,;: ").lower()


class Accuracy(metrics.RowMetric):
    NAME = "accuracy"
    DESCRIPTION = __doc__

    @staticmethod
    def row_score(prediction, reference, ignore_case):
        return label(prediction) == label(reference)  # always case-insensitive

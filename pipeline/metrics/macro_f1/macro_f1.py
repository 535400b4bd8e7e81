"""Macro F1 over the reference labels: F1 per label, averaged with equal weight, so rare labels count as
much as common ones. A prediction outside the label set is a miss for its reference label. Per-row
scores are correctness (1/0), for paired comparisons; the value is not their mean."""

from pipeline import metrics
from pipeline.metrics import normalize


class MacroF1(metrics.RowMetric):
    NAME = "macro_f1"
    DESCRIPTION = __doc__
    MEAN_OF_ROWS = False

    @staticmethod
    def score(predictions, references, ignore_case=False):
        preds = [normalize(p, ignore_case) for p in predictions]
        refs = [normalize(r, ignore_case) for r in references]
        f1s = []
        for label in sorted(set(refs)):
            tp = sum(p == label and r == label for p, r in zip(preds, refs, strict=True))
            fp = sum(p == label and r != label for p, r in zip(preds, refs, strict=True))
            fn = sum(p != label and r == label for p, r in zip(preds, refs, strict=True))
            f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
        per_row = [float(p == r) for p, r in zip(preds, refs, strict=True)]
        return (sum(f1s) / len(f1s) if f1s else 0.0), per_row

"""chrF: character n-gram F-score (n = 1..6, recall weighted by beta = 2, whitespace ignored), per row;
the value is the mean of the sentence scores, in [0, 1]."""

from collections import Counter

from pipeline import metrics
from pipeline.metrics import mean, normalize

MAX_ORDER = 6
BETA = 2.0


def chrf(prediction: str, reference: str) -> float:
    p, r = "".join(prediction.split()), "".join(reference.split())
    if not p or not r:
        return float(p == r)
    precisions, recalls = [], []
    for n in range(1, MAX_ORDER + 1):
        pred_grams = Counter(p[i : i + n] for i in range(len(p) - n + 1))
        ref_grams = Counter(r[i : i + n] for i in range(len(r) - n + 1))
        if not pred_grams or not ref_grams:
            continue
        overlap = sum((pred_grams & ref_grams).values())
        precisions.append(overlap / sum(pred_grams.values()))
        recalls.append(overlap / sum(ref_grams.values()))
    precision, recall = mean(precisions), mean(recalls)
    if precision + recall == 0:
        return 0.0
    return (1 + BETA**2) * precision * recall / (BETA**2 * precision + recall)


class ChrF(metrics.RowMetric):
    NAME = "chrf"
    DESCRIPTION = __doc__

    @staticmethod
    def row_score(prediction, reference, ignore_case):
        return chrf(normalize(prediction, ignore_case), normalize(reference, ignore_case))

"""ROUGE-L: F1 of the longest common subsequence of words between prediction and reference (per row;
the value is the mean over rows). Words are lowercased and split on whitespace."""

from pipeline import metrics


def lcs_length(a: list[str], b: list[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    p, r = prediction.lower().split(), reference.lower().split()
    if not p or not r:
        return float(p == r)
    common = lcs_length(p, r)
    return 0.0 if common == 0 else 2 * common / (len(p) + len(r))


class RougeL(metrics.RowMetric):
    NAME = "rouge_l"
    DESCRIPTION = __doc__

    @staticmethod
    def row_score(prediction, reference, ignore_case):
        return rouge_l(prediction, reference)  # words are lowercased anyway

"""Exact match: the share of predictions equal to their reference, after stripping whitespace.

Besides the mean it returns the per-row scores, which the report needs for confidence intervals and
paired comparisons.
"""

import datasets
import evaluate

_DESCRIPTION = "Share of predictions that equal their reference after stripping surrounding whitespace."

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): generated answers.
    references (list of str): expected answers.
    ignore_case (bool): compare lowercased strings. Default False.
Returns:
    exact_match (float): mean of the per-row scores, in [0, 1].
    per_row (list of int): 1 where the row matched, else 0.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, ignore_case=False):
        def normalize(text):
            text = text.strip()
            return text.lower() if ignore_case else text

        per_row = [int(normalize(p) == normalize(r)) for p, r in zip(predictions, references, strict=True)]
        return {"exact_match": sum(per_row) / len(per_row) if per_row else 0.0, "per_row": per_row}

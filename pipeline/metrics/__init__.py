"""Task metrics: modules shipped with the package, loaded offline with `evaluate.load(path)`.

Each module in a folder of its own (`exact_match/exact_match.py`, ...) defines a `RowMetric`
subclass whose `score(predictions, references, ignore_case)` returns the metric's value and a score
per row. Per-row scores are what confidence intervals and paired comparisons are built from; a
metric that is not the mean of its rows (macro F1) says so with `MEAN_OF_ROWS = False`, and its
interval is bootstrapped by recomputing it on resampled rows.

A recipe may also name its own metric as `path/to/file.py:function` (relative to the recipe), where
`function(predictions, references)` returns one score per row; its value is their mean.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
from collections.abc import Callable
from pathlib import Path

import datasets
import evaluate

from pipeline.errors import PipelineError
from pipeline.stats import bootstrap_ci

METRICS_DIR = Path(__file__).resolve().parent


def metric_path(name: str) -> str:
    """Folder of a shipped metric module, as evaluate.load expects it."""
    return str(METRICS_DIR / name)


def available_metrics() -> list[str]:
    return sorted(p.name for p in METRICS_DIR.iterdir() if (p / f"{p.name}.py").is_file())


def normalize(text: str, ignore_case: bool) -> str:
    text = text.strip()
    return text.lower() if ignore_case else text


class RowMetric(evaluate.Metric):
    """An `evaluate` metric over string predictions and references that also returns per-row scores.

    Subclasses define NAME, DESCRIPTION and a static `row_score(prediction, reference, ignore_case)`;
    the value is the mean over rows. A metric that is not a mean of its rows (macro F1) overrides
    `score(predictions, references, ignore_case)` -> (value, per-row scores) instead. Metric modules
    refer to this class as `metrics.RowMetric`, not by importing the name: evaluate takes the first
    Metric class it finds in a module as the module's own.
    """

    NAME = ""
    DESCRIPTION = ""
    MEAN_OF_ROWS = True

    @classmethod
    def score(cls, predictions: list[str], references: list[str], ignore_case: bool = False):
        per_row = [float(cls.row_score(p, r, ignore_case)) for p, r in zip(predictions, references, strict=True)]
        return mean(per_row), per_row

    def _info(self):
        return evaluate.MetricInfo(
            description=self.DESCRIPTION,
            citation="",
            inputs_description="predictions, references: lists of strings; ignore_case: bool",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, ignore_case=False):
        value, per_row = self.score(predictions, references, ignore_case)
        return {self.NAME: value, "per_row": per_row, "mean_of_rows": self.MEAN_OF_ROWS}


# one Markdown code fence around the whole answer (```json ... ```), as chat models often write JSON
FENCED = re.compile(r"\A```[\w-]*[ \t]*\n(.*)\n[ \t]*```\Z", re.DOTALL)


def parse_json_object(text: str) -> dict | None:
    """The text as a JSON object, or None where it does not parse or is not an object (json_match, json_top_level).
    An answer that is one fenced code block and nothing else is read inside its fence: the object a program gets
    after stripping the fence, which every client of a chat model does; anything around the fence is not JSON."""
    text = text.strip()
    fenced = FENCED.match(text)
    try:
        value = json.loads(fenced.group(1) if fenced else text)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def user_metric(spec: str, recipe_dir: Path) -> Callable[[list[str], list[str]], list[float]]:
    """Load `file.py:function` (relative to the recipe) or `package.module:function`.

    A file that does not run (a syntax error, an import it lacks, an exception at import) is the user's
    problem, named with its line, never a traceback from here.
    """
    target, _, function = spec.rpartition(":")
    try:
        if target.endswith(".py"):
            path = (recipe_dir / target).resolve()
            if not path.is_file():
                raise PipelineError(f"evaluate.metrics: {spec}: no such file {path}")
            module_spec = importlib.util.spec_from_file_location(f"user_metric_{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except PipelineError:
        raise
    except SyntaxError as e:
        raise PipelineError(f"evaluate.metrics: {spec}: {e.filename}:{e.lineno}: syntax error: {e.msg}") from None
    except Exception as e:  # noqa: BLE001 - whatever the user's module raises while it is imported
        raise PipelineError(f"evaluate.metrics: {spec}: importing it raised {_raised(e, target)}") from None
    scorer = getattr(module, function, None)
    if not callable(scorer):
        raise PipelineError(f"evaluate.metrics: {spec}: {target} has no function {function!r}")
    return scorer


def scorer(name: str) -> Callable[[list[str], list[str], bool], dict]:
    """The metric `name` (shipped, or the user's file.py:function) as one function
    (predictions, references, ignore_case) -> {"value", "per_row", "mean_of_rows", ...}."""
    if ":" in name:
        function = user_metric(name, Path.cwd())

        def score_user(predictions, references, ignore_case):
            per_row = score_rows(function, name, predictions, references)
            return {"value": sum(per_row) / len(per_row), "per_row": per_row, "mean_of_rows": True}

        return score_user
    module = evaluate.load(metric_path(name))

    def score_shipped(predictions, references, ignore_case):
        computed = module.compute(predictions=predictions, references=references, ignore_case=ignore_case)
        return {"value": computed.pop(name), **computed}

    return score_shipped


def score_rows(scorer: Callable, spec: str, predictions: list[str], references: list[str]) -> list[float]:
    """A user metric's scores, one finite number per row, or a PipelineError that says what it did instead."""
    try:
        scores = scorer(list(predictions), list(references))
        per_row = [float(x) for x in scores]
    except Exception as e:  # noqa: BLE001 - the user's function, on these rows
        raise PipelineError(
            f"evaluate.metrics: {spec}: raised {_raised(e, spec.rpartition(':')[0])} when scoring {len(predictions)} "
            "rows; it must return one number per row for (predictions, references), lists of strings"
        ) from None
    if len(per_row) != len(predictions):
        raise PipelineError(f"evaluate.metrics: {spec}: returned {len(per_row)} scores for {len(predictions)} rows")
    bad = next((i for i, x in enumerate(per_row) if not math.isfinite(x)), None)
    if bad is not None:
        raise PipelineError(
            f"evaluate.metrics: {spec}: returned {per_row[bad]} for row {bad + 1} "
            f"(prediction {predictions[bad]!r}, reference {references[bad]!r}); every score must be a finite number"
        )
    return per_row


def _raised(error: BaseException, target: str) -> str:
    """`TypeError: message (at metric.py:12)`: the exception and the line of the user's file it came from."""
    import traceback

    name = Path(target).name if target.endswith(".py") else target.replace(".", "/") + ".py"
    frames = [f for f in traceback.extract_tb(error.__traceback__) if f.filename.endswith(name)]
    where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:200] if text else ''}{where}"


def score_function(name: str) -> Callable[..., tuple[float, list[float]]]:
    """The `score` of a shipped metric, for recomputing it on resampled rows (bootstrap intervals)."""
    path = METRICS_DIR / name / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"pipeline_metric_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for value in vars(module).values():
        if isinstance(value, type) and issubclass(value, RowMetric) and value is not RowMetric:
            return value.score
    raise PipelineError(f"{path}: no RowMetric subclass")


def metric_interval(name: str, scores: dict, texts: tuple[list, list] | None, settings, seed: int) -> tuple:
    """The bootstrap 95% interval of one metric's value: resampled per-row scores, or, for a metric that is
    not a mean of rows (macro F1), the metric recomputed on resampled (prediction, reference) rows."""
    recompute = None
    if not scores.get("mean_of_rows", True) and texts:
        score = score_function(name)
        predictions, references = texts

        def recompute(rows):
            return score([predictions[i] for i in rows], [references[i] for i in rows], settings.ignore_case)[0]

    return bootstrap_ci(scores["per_row"], settings.bootstrap_samples, seed, recompute)

"""Statistics the report, the sweeps and the learning curves share: bootstrap intervals, paired tests, the
saturating fit of a learning curve. Pure functions on numbers; no files, no models."""

from __future__ import annotations

import math
import random
from collections.abc import Callable


def bootstrap_ci(
    per_row: list[float], samples: int, seed: int = 0, recompute: Callable[[list[int]], float] | None = None
) -> tuple[float, float]:
    """Percentile bootstrap 95% interval: of the mean of per-row scores, or of `recompute(row indices)`
    for metrics that are not a mean of rows (macro F1)."""
    if not per_row:
        return (0.0, 0.0)
    rng = random.Random(seed)
    n = len(per_row)
    values = []
    for _ in range(samples):
        picked = [rng.randrange(n) for _ in range(n)]
        values.append(recompute(picked) if recompute else sum(per_row[i] for i in picked) / n)
    values.sort()
    return (values[int(0.025 * (samples - 1))], values[int(math.ceil(0.975 * (samples - 1)))])


def paired_bootstrap_p(a: list[float], b: list[float], samples: int, seed: int = 0) -> float:
    """Two-sided p-value that mean(a) and mean(b) differ, resampling rows in pairs."""
    rng = random.Random(seed)
    n = len(a)
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    if not any(diffs):
        return 1.0
    at_or_below = at_or_above = 0
    for _ in range(samples):
        mean_diff = sum(diffs[rng.randrange(n)] for _ in range(n)) / n
        at_or_below += mean_diff <= 0
        at_or_above += mean_diff >= 0
    return min(1.0, 2 * min(at_or_below, at_or_above) / samples)


def gap_closed(specialized: float, base: float, reference: float) -> float | None:
    """(specialized - base) / (reference - base): 1.0 means the specialist reached the reference."""
    if reference == base:
        return None
    return (specialized - base) / (reference - base)


def mcnemar_exact_p(wins: int, losses: int) -> float:
    """Two-sided exact McNemar test on the discordant rows (binomial with p = 1/2)."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired(specialized_rows: list[float], other_rows: list[float], samples: int = 1000, seed: int = 0) -> dict:
    """Specialized vs another candidate on the same rows: McNemar for 0/1 scores, else a paired bootstrap."""
    wins = [i for i, (s, o) in enumerate(zip(specialized_rows, other_rows, strict=True)) if s > o]
    losses = [i for i, (s, o) in enumerate(zip(specialized_rows, other_rows, strict=True)) if s < o]
    binary = set(specialized_rows) | set(other_rows) <= {0, 1}
    return {
        "wins": len(wins),
        "losses": len(losses),
        "test": "mcnemar_exact" if binary else "paired_bootstrap",
        "p_value": mcnemar_exact_p(len(wins), len(losses))
        if binary
        else paired_bootstrap_p(specialized_rows, other_rows, samples, seed),
        "won_rows": wins,
        "lost_rows": losses,
    }


# --- learning curves ------------------------------------------------------------------------------


def fit_saturating(rows: list[float], errors: list[float]) -> dict | None:
    """Fit error(n) = a * n^-b + c to a learning curve (rows trained on -> error on the eval rows).

    c is the error more rows would not remove (the floor: label noise, what the model cannot learn), b how
    fast the rest falls. The floor is searched on a grid below the smallest error and a, b are the least
    squares line of log(error - c) on log(n) for each; the fit kept is the one closest in error itself.
    None with fewer than three distinct sizes or a curve that does not fall (a flat or rising curve has no
    power law in it). Needs numpy only.
    """
    import numpy as np

    n, err = np.asarray(rows, dtype=float), np.asarray(errors, dtype=float)
    if len(set(rows)) < 3 or err[np.argmax(n)] >= err[np.argmin(n)]:
        return None
    best = None
    for c in np.linspace(0.0, float(err.min()), 200, endpoint=False):
        slope, intercept = np.polyfit(np.log(n), np.log(np.maximum(err - c, 1e-9)), 1)
        if slope >= 0:
            continue
        predicted = np.exp(intercept) * n**slope + c
        residual = float(((predicted - err) ** 2).sum())
        if best is None or residual < best["residual"]:
            best = {"a": float(np.exp(intercept)), "b": float(-slope), "c": float(c), "residual": residual}
    return best


def predicted_error(fit: dict, rows: float) -> float:
    return fit["a"] * rows ** -fit["b"] + fit["c"]


MAX_PROJECTED_ROWS = 1e12  # beyond this a projection says "not by adding rows", not a number


def rows_for_error(fit: dict, error: float) -> float | None:
    """Training rows at which the fitted curve reaches `error`; None when that is at or below its floor, or
    so far out (a curve that barely falls) that no data set would reach it."""
    if error <= fit["c"]:
        return None
    log_rows = (math.log(fit["a"]) - math.log(error - fit["c"])) / fit["b"]
    return math.exp(log_rows) if log_rows < math.log(MAX_PROJECTED_ROWS) else None


# --- calibration --------------------------------------------------------------------------------------


def calibration(confidences: list[float], correct: list[float], bins: int = 10) -> dict:
    """Reliability of confidences: per equal-width bin its rows, mean confidence and accuracy, and the expected
    calibration error (the rows-weighted mean gap between the two). `correct` is 1 for a right answer."""
    table = []
    total = len(confidences)
    ece = 0.0
    for b in range(bins):
        low, high = b / bins, (b + 1) / bins
        members = [i for i, c in enumerate(confidences) if low <= c < high or (b == bins - 1 and c == 1.0)]
        if not members:
            continue
        confidence = sum(confidences[i] for i in members) / len(members)
        accuracy = sum(correct[i] for i in members) / len(members)
        ece += len(members) / total * abs(accuracy - confidence)
        table.append({"low": low, "high": high, "rows": len(members), "confidence": confidence, "accuracy": accuracy})
    return {"ece": ece, "bins": table, "rows": total}


def cascade_latency(local: list[float], reference: list[float], share_local: float) -> dict:
    """Seconds per request of a cascade, from single-request samples of each model: every request waits for the
    local model, the deferred share for the reference too (drawn independently). Mean, p50 and p95 of that mixture:
    each local sample weighs share_local / n, each (local + reference) pair (1 - share_local) / (n m)."""
    n, m = len(local), len(reference)
    points = sorted(
        [(x, share_local / n) for x in local] + [(x + y, (1 - share_local) / (n * m)) for x in local for y in reference]
    )

    def quantile(q: float) -> float:
        total = 0.0
        for value, weight in points:
            total += weight
            if total >= q - 1e-12:
                return value
        return points[-1][0]

    return {"mean": sum(v * w for v, w in points), "p50": quantile(0.5), "p95": quantile(0.95)}

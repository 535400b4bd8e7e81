"""What every plot of the report shares: matplotlib without a display, and a file written atomically."""

from __future__ import annotations

import math
from pathlib import Path


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def save(figure, path: Path, tight: bool = True) -> None:
    """Write the figure as PNG through a temp file (a killed run never leaves half an image) and close it.
    tight: crop to what is drawn, legends outside the axes included."""
    plt = pyplot()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(tmp, dpi=110, **({"bbox_inches": "tight"} if tight else {}))
    plt.close(figure)
    tmp.replace(path)


def tick_label(value: float) -> str:
    """A log axis's 1-2-5 tick written as the number it is (0.05, 0.2, 5, 2,000), not as a power of ten."""
    decimals = max(0, -math.floor(math.log10(value))) if value > 0 else 0
    return f"{value:,.{decimals}f}"


def clear_of(x: float, y: float, labelled: list[tuple[float, float]]) -> bool:
    """Whether a value written beside the point (x on a log axis, y linear) keeps clear of those already written."""
    return all(abs(math.log10(x / ox)) > 0.25 or abs(y - oy) > 0.06 for ox, oy in labelled)

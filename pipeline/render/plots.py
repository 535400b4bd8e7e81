"""What every plot of the report shares: matplotlib without a display, and a file written atomically."""

from __future__ import annotations

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

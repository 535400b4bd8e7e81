"""Metric modules shipped with the package and loaded offline with `evaluate.load(path)`."""

from pathlib import Path

METRICS_DIR = Path(__file__).resolve().parent


def metric_path(name: str) -> str:
    """Folder of a shipped metric module, as evaluate.load expects it."""
    return str(METRICS_DIR / name)


def available_metrics() -> list[str]:
    return sorted(p.name for p in METRICS_DIR.iterdir() if (p / f"{p.name}.py").is_file())

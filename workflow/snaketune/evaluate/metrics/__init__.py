"""Metrics as `evaluate` modules shipped with the package, loaded by path (no hub needed)."""

from pathlib import Path

METRICS_DIR = Path(__file__).parent


def load_metric(name: str):
    import evaluate

    return evaluate.load(str(METRICS_DIR / name))

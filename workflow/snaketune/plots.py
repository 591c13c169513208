"""PNG figures for a reader of the results or the MLflow UI: loss curves, confusion matrices and
sweeps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from snaketune.fileio import atomic_path


def _figure():
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes or CI
    import matplotlib.pyplot as plt

    return plt


def loss_curve(history: list[dict], out_path: Path, title: str) -> None:
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot([r["step"] for r in history], [r["loss"] for r in history], label="train loss")
    val = [r for r in history if "val_loss" in r]
    ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    with atomic_path(out_path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def confusion_matrix(matrix: list[list[int]], labels: list[str], out_path: Path) -> None:
    plt = _figure()
    size = max(4, 0.6 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size), dpi=100)
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    peak = max(max(row) for row in matrix) or 1
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            ax.text(
                j,
                i,
                str(count),
                ha="center",
                va="center",
                color="white" if count > peak / 2 else "black",
            )
    fig.tight_layout()
    with atomic_path(out_path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def nll_by_position(values: list[float], out_path: Path) -> None:
    """Mean test NLL at each context position: how much the model gains from earlier tokens."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(range(1, len(values) + 1), values)
    ax.set_xlabel("position in context (tokens seen before the target)")
    ax.set_ylabel("mean NLL (nats)")
    ax.set_title("test NLL by context position")
    fig.tight_layout()
    with atomic_path(out_path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def sweep(
    rows: list[dict[str, Any]], keys: list[str], metrics: list[str], out: Path, title: str
) -> None:
    """One panel per metric: the metric against the first swept key, one line per value of
    the other swept keys."""
    plt = _figure()
    x_key, others = keys[0], keys[1:]
    fig, axes = plt.subplots(
        1, max(1, len(metrics)), figsize=(4.5 * max(1, len(metrics)), 3.6), dpi=100, squeeze=False
    )
    for ax, metric in zip(axes[0], metrics, strict=False):
        groups: dict[tuple, list[dict[str, Any]]] = {}
        for row in rows:
            if metric in row and row.get(x_key) is not None:
                groups.setdefault(tuple(row.get(k) for k in others), []).append(row)
        for group, members in groups.items():
            members.sort(key=lambda r: r[x_key])
            label = ", ".join(f"{k}={v}" for k, v in zip(others, group, strict=True)) or None
            ax.plot([r[x_key] for r in members], [r[metric] for r in members], "o-", label=label)
        values = [r[x_key] for r in rows if isinstance(r.get(x_key), int | float)]
        if values and min(values) > 0 and max(values) / min(values) >= 10:
            ax.set_xscale("log")
        ax.set_xlabel(x_key)
        ax.set_ylabel(metric)
        if any(label for label in groups if label):
            ax.legend(fontsize="small")
    fig.suptitle(f"sweep {title}")
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)

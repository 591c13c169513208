"""Which data a run saw: the Parquet splits as MLflow dataset inputs, without reading them.

Each split becomes a dataset named "<dataset>/<split>" whose digest is the split file's sha256
and whose profile holds its row count (both recorded by the split stage in its manifest), and
whose source is the dataset's download URL. MLflow then shows on every
train and evaluate run exactly which version of which split it used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from snaketune.names import SPLITS, TEST, TRAIN, VAL

SPLIT_CONTEXTS = dict(zip(SPLITS, ("training", "validation", "test"), strict=True))
RUN_SPLITS = {"train": (TRAIN, VAL), "evaluate": (TEST,)}
"""The splits each stage's run read, in MLflow's context vocabulary."""
DIGEST_CHARS = 16  # MLflow keeps at most 36 characters of a dataset digest
SPLIT_SCHEMA = {
    "mlflow_colspec": [
        {"type": "string", "name": "doc_id", "required": True},
        {"type": "string", "name": "text", "required": True},
        {"type": "string", "name": "label", "required": False},
    ]
}


@dataclass(frozen=True)
class SplitDataset:
    name: str
    digest: str
    sha256: str
    source_url: str
    rows: int | None
    path: str

    def entity(self):
        from mlflow.entities import Dataset

        remote = urlsplit(self.source_url).scheme in ("http", "https")
        source = {"url": self.source_url} if remote else {"uri": self.source_url}
        return Dataset(
            name=self.name,
            digest=self.digest,
            source_type="http" if remote else "local",
            source=json.dumps(source),
            schema=json.dumps(SPLIT_SCHEMA),
            profile=json.dumps({"num_rows": self.rows}),
        )


def source_url(url: str) -> str:
    """The download URL without its query and fragment, which often carry a signature or token
    (credentials in the userinfo part are the caller's to redact)."""
    return urlunsplit(urlsplit(url)._replace(query="", fragment=""))


def split_datasets(
    dataset: str, download_url: str, split: dict[str, Any]
) -> dict[str, SplitDataset]:
    """The splits the split manifest recorded writing, keyed by split name ('train', ...).
    `download_url` should come without credentials (snaketune.track.reconcile.redact)."""
    url = source_url(download_url)
    digests, paths = split.get("outputs", {}), split.get("paths", {})
    counts = split.get("counts", {})
    out = {}
    for name in SPLIT_CONTEXTS:
        if name not in digests:
            continue
        rows = counts.get(name)
        out[name] = SplitDataset(
            name=f"{dataset}/{name}",
            digest=digests[name][:DIGEST_CHARS],
            sha256=digests[name],
            source_url=url,
            rows=rows if isinstance(rows, int) else None,
            path=paths[name],
        )
    return out


def dataset_inputs(datasets: dict[str, SplitDataset], stage: str) -> list:
    """The DatasetInputs for one stage's run: its splits, each tagged with its context."""
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    out = []
    for name in RUN_SPLITS.get(stage, ()):
        if name in datasets:
            split = datasets[name]
            tags = [
                InputTag(MLFLOW_DATASET_CONTEXT, SPLIT_CONTEXTS[name]),
                InputTag("snaketune.sha256", split.sha256),
                InputTag("snaketune.path", split.path),
            ]
            out.append(DatasetInput(split.entity(), tags))
    return out

"""Stages keyed by what they compute: one job per distinct clean, split, tokenizer and tokenize,
shared by every experiment whose settings for that stage and everything upstream are the same.

A shared stage's key is `<dataset>-<digest>`, the digest of the stage's name, its settings and
its upstream stage's key (the download is keyed by the dataset's sha256), so two experiments
share a stage exactly when they share all it is computed from, and a changed setting gives new
keys from that stage down. Its outputs live under results/shared/<stage>/<key>/; each
experiment keeps results/<experiment>/<stage> as a relative link to them, the place a user
looks. Training, evaluation and tracking stay per experiment.

This module imports nothing heavy: the workflow reads it when it builds the DAG.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snaketune.data.settings import clean_job, dataset_of, split_settings, tokenizer_settings
from snaketune.names import SHARED_FOLDER
from snaketune.settings import ConfigView, to_json
from snaketune.tokenize.settings import tokenize_job

SHARED_STAGES: tuple[tuple[str, Callable[..., Any]], ...] = (
    ("clean", clean_job),
    ("split", split_settings),
    ("tokenizer", tokenizer_settings),
    ("tokenize", tokenize_job),
)
"""The shared stages in pipeline order, each with the settings that key it."""


def stage_key(stage: str, dataset: str, upstream: str, settings: Any) -> str:
    blob = json.dumps([stage, upstream, to_json(settings)])
    return f"{dataset}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


def keys_of(view: ConfigView, experiment: str) -> dict[str, str]:
    """The key of each shared stage of one experiment."""
    dataset = view.experiment(experiment)["dataset"]
    # what the download gives, wherever it comes from
    upstream = dataset_of(view, experiment).sha256
    keys = {}
    for stage, settings_of in SHARED_STAGES:
        upstream = keys[stage] = stage_key(stage, dataset, upstream, settings_of(view, experiment))
    return keys


@dataclass(frozen=True)
class Sharing:
    """Every experiment's shared-stage keys, and for each key the experiments computing it."""

    keys: dict[str, dict[str, str]]
    """experiment -> stage -> key."""
    owners: dict[str, str]
    """key -> the first experiment (in config order) that uses it."""

    @classmethod
    def of(cls, view: ConfigView, experiments: Iterable[str]) -> Sharing:
        keys = {name: keys_of(view, name) for name in experiments}
        owners: dict[str, str] = {}
        for name, stages in keys.items():
            for key in stages.values():
                owners.setdefault(key, name)
        return cls(keys, owners)

    def owner(self, key: str) -> str:
        """The experiment whose settings the shared job takes (any user would give the same)."""
        return self.owners[key]

    def all_keys(self) -> set[str]:
        return set(self.owners)


def stage_dir(results: str | Path, stage: str, key: str) -> Path:
    return Path(results) / SHARED_FOLDER / stage / key


TRACKING_LINK = "tracking"
"""<stage_dir>/tracking: a link to the owner's tracking folder, where the shared stage's live
run joins the owner's run tree (snaketune.track.live)."""


def link_all(
    results: str | Path,
    sharing: Sharing,
    tracking: Callable[[str], str],
    existing_only: bool = False,
) -> list[str]:
    """Point results/<experiment>/<stage> at the shared outputs it uses, and each shared
    stage's tracking link at its owner's tracking folder (`tracking(experiment)`); with
    existing_only, only where those outputs exist (links deleted by hand come back, and nothing
    is made for outputs yet to come). The links are relative, so a moved checkout keeps them.
    Returns a message per real folder of an older layout in the way (left as it is)."""
    problems = []
    for experiment, keys in sharing.keys.items():
        for stage, key in keys.items():
            shared = stage_dir(results, stage, key)
            if existing_only and not shared.is_dir():
                continue
            view = Path(results) / experiment / stage
            if view.exists() and not view.is_symlink():
                problems.append(
                    f"{view} is a folder of an earlier snaketune layout; the {stage} outputs "
                    f"this experiment uses are in {shared}. Delete {view} to get a link there."
                )
            else:
                relink(view, shared)
            if sharing.owner(key) == experiment:
                relink(shared / TRACKING_LINK, Path(tracking(experiment)))
    return problems


def relink(link: Path, target: Path) -> None:
    """Make `link` a relative link to `target` (replacing another link there)."""
    relative = os.path.relpath(target, link.parent)
    if link.is_symlink():
        if os.readlink(link) == relative:
            return
        link.unlink()
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(relative, target_is_directory=True)

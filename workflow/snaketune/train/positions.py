"""How many positions a model has: one reading of a transformers config (an object, or its
config.json as a dict) for the config check before any job, the trainer, the evaluation and the
served model. Imports nothing heavy: the config check runs while the workflow builds its DAG."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

POSITION_KEYS = ("n_positions", "max_position_embeddings")
"""Where a config holds its positions: GPT-2's name, then every other family's."""


def config_positions(config: Any) -> int | None:
    """The positions a config gives, or None (no config, or none given: the LSTM)."""
    if config is None:
        return None
    values = config if isinstance(config, Mapping) else vars(config)
    return next((int(values[k]) for k in POSITION_KEYS if isinstance(values.get(k), int)), None)


def model_positions(model: Any) -> int | None:
    """The longest sequence the model takes (None: no limit, as the LSTM)."""
    return config_positions(getattr(model, "config", None))

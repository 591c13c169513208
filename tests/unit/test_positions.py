"""A model's positions are read one way, from a config object or its config.json."""

from __future__ import annotations

from types import SimpleNamespace

from transformers import GPT2Config, LlamaConfig

from snaketune.train.positions import config_positions, model_positions


def test_gpt2_and_llama_configs_give_their_positions_as_objects_and_as_json():
    for config, positions in (
        (GPT2Config(n_positions=64), 64),
        (LlamaConfig(max_position_embeddings=99), 99),
    ):
        assert config_positions(config) == positions
        assert config_positions(config.to_dict()) == positions


def test_a_model_without_positions_has_no_limit():
    assert model_positions(SimpleNamespace(config=SimpleNamespace(n_embd=8))) is None
    assert model_positions(object()) is None
    assert config_positions({"n_positions": "64"}) is None  # not a count

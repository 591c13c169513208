"""Config validation: the default config is valid, cross-checks between keys, and the settings
dataclasses agree with the schema key for key. Problems that must stop a run before any job are
in tests/reliability."""

from __future__ import annotations

import copy
from dataclasses import fields, is_dataclass

import pytest

from snaketune.config import SCHEMA, cross_checks, preset_names, schema_problems
from snaketune.context import LIVE_AFTER_VARIABLE
from snaketune.data.settings import FORMATS
from snaketune.sections import SECTIONS
from snaketune.tokenize.settings import LM_PACKINGS
from tests.support.repo import DEFAULT_CONFIG, REPO
from tests.support.workflow import config_with, with_defaults


def test_default_config_is_valid():
    assert schema_problems(DEFAULT_CONFIG) == []


def test_cross_checks_find_missing_dataset_and_bad_ratios():
    config = config_with(experiments__0__dataset="nope")
    config["experiments"][1]["split"] = {"train": 0.5, "val": 0.1, "test": 0.1, "salt": ""}
    filled = with_defaults(config)
    problems = cross_checks(filled)
    assert any(p.startswith("experiments[0].dataset:") and "support-demo" in p for p in problems)
    assert any(p.startswith("experiments[1].split:") and "0.7" in p for p in problems)


def test_a_bad_live_after_setting_in_the_environment_is_refused_with_the_config():
    environ = {LIVE_AFTER_VARIABLE: "later"}
    problems = cross_checks(with_defaults(config_with()), environ=environ)
    assert [p for p in problems if p.startswith(f"{LIVE_AFTER_VARIABLE}='later' (environment)")]


def test_heads_must_divide_embedding_size():
    filled = with_defaults(config_with(experiments__0__model__n_head=3))
    assert any("model.n_embd" in p and "n_head=3" in p for p in cross_checks(filled))


def test_tokenize_packing_names_the_key_and_its_allowed_values():
    (problem,) = schema_problems(config_with(experiments__0__tokenize={"packing": "tight"}))
    assert problem.startswith("experiments[0].tokenize.packing")
    assert "across_documents" in problem and "per_document" in problem
    assert schema_problems(config_with(experiments__0__tokenize={"packing": "per_document"})) == []


# --- the schema and the reference are made from the settings dataclasses ----------------------


def test_the_committed_schema_is_the_one_the_settings_make():
    """config.schema.yaml is made by `make schema` from snaketune.settings: a setting changed
    there without it would validate configs by the old rules."""
    from snaketune.schema import schema_text

    assert SCHEMA.read_text() == schema_text(), "run `make schema` and commit what it writes"


def test_the_readme_settings_reference_is_the_one_the_settings_make():
    from snaketune.schema import readme_with_reference

    readme = (REPO / "README.md").read_text()
    assert readme == readme_with_reference(readme), "run `make schema` and commit what it writes"


def test_every_key_of_a_section_has_a_description_and_its_default():
    """Each field of a section's dataclass is a key of the schema with that field's default."""
    from snaketune.schema import config_schema, default_of, plain

    schema = config_schema()["properties"]
    experiment = schema["experiments"]["items"]["properties"]
    for name, cls in SECTIONS.items():
        keys = experiment[name]["properties"]
        for f in fields(cls):
            default = default_of(f)
            key = keys[f.name]
            assert key["description"], (name, f.name)
            if not is_dataclass(default):
                assert key["default"] == plain(default), (name, f.name)
    assert schema["experiments"]["items"]["required"] == ["name", "dataset", "task"]
    entry = schema["datasets"]["additionalProperties"]
    assert entry["required"] == ["url", "sha256", "format"]
    assert entry["properties"]["format"]["enum"] == list(FORMATS)
    assert experiment["tokenize"]["properties"]["packing"]["enum"] == list(LM_PACKINGS)


def test_a_config_key_without_a_description_cannot_make_a_schema():
    from dataclasses import dataclass, field

    from snaketune import schema

    @dataclass
    class Undocumented:
        documented: int = field(default=1, metadata={"description": "a key", "schema": {}})
        bare: int = 2

    with pytest.raises(TypeError, match=r"\['bare'\] are config keys without a description"):
        schema.properties(Undocumented)


def test_memory_retries_set_with_several_processes_is_refused_not_ignored():
    import copy

    from snaketune.config import ConfigError, validated

    def with_train(**train) -> dict:
        config = copy.deepcopy(DEFAULT_CONFIG)
        config["experiments"][0]["train"].update(train)
        return config

    with pytest.raises(ConfigError, match=r"experiments\[0\]\.train\.memory_retries: is for one"):
        validated(with_train(processes=2, memory_retries=8))
    validated(with_train(processes=2))  # the default asks nothing: several processes stay allowed


def test_batch_size_auto_is_refused_where_its_search_cannot_work():
    from snaketune.config import ConfigError, validated

    def with_train(**train) -> dict:
        config = copy.deepcopy(DEFAULT_CONFIG)
        config["experiments"][0]["train"].update(train)
        return config

    (problem,) = schema_problems(with_train(batch_size="big"))
    assert problem.startswith("experiments[0].train.batch_size")
    with pytest.raises(ConfigError, match=r"train\.batch_size: auto searches .* in one process"):
        validated(with_train(batch_size="auto", grad_accum=8, processes=2))
    with pytest.raises(ConfigError, match=r"train\.batch_size: auto takes the examples per step"):
        validated(with_train(batch_size="auto"))
    validated(with_train(batch_size="auto", grad_accum=64))


def test_the_fast_encoder_asked_for_classification_is_refused_before_any_job():
    import copy

    from snaketune.config import ConfigError, validated

    def with_classifier_encoder(encoder: str) -> tuple[dict, int]:
        config = copy.deepcopy(DEFAULT_CONFIG)
        tasks = [e["task"] for e in config["experiments"]]
        where = tasks.index("sequence_classification")
        config["experiments"][where].setdefault("tokenize", {})["encoder"] = encoder
        return config, where

    config, where = with_classifier_encoder("gigatoken")
    refused = rf"experiments\[{where}\]\.tokenize\.encoder: 'gigatoken' encodes causal_lm"
    with pytest.raises(ConfigError, match=refused):
        validated(config)
    validated(with_classifier_encoder("auto")[0])  # auto picks tokenizers for classification


def test_packings_that_cannot_keep_what_they_pack_apart_are_refused_by_key():
    """documents_apart is for plain text (packed instruction examples are always kept apart);
    the LSTM keeps nothing apart."""
    from snaketune.config import ConfigError, validated

    def experiment(plain: bool, arch: str, packing: str) -> dict:
        config = copy.deepcopy(DEFAULT_CONFIG)
        config["experiments"] = [config["experiments"][0]]  # the demo's instruction LM
        if plain:
            dataset = config["datasets"]["support-demo"]
            del dataset["prompt_column"], dataset["response_column"]
        config["experiments"][0]["tokenize"]["packing"] = packing
        config["experiments"][0]["model"]["arch"] = arch
        return config

    refused = [
        (experiment(False, "gpt2", "documents_apart"), "tokenize.packing: documents_apart is"),
        (experiment(False, "lstm", "across_documents"), "model.arch: .*packed instruction"),
        (experiment(True, "lstm", "documents_apart"), "model.arch: .*packed document"),
    ]
    for config, says in refused:
        with pytest.raises(ConfigError, match=rf"experiments\[0\]\.{says}"):
            validated(config)
    validated(experiment(True, "gpt2", "documents_apart"))
    validated(experiment(True, "lstm", "across_documents"))


def test_keys_of_the_other_task_are_refused_by_name():
    config = config_with(experiments__1__tokenize__block_size=64)
    config["experiments"][1]["evaluate"] = {"prompts": ["Hi"], "top_p": 0.9}
    given = copy.deepcopy(config)
    problems = cross_checks(with_defaults(config), REPO, given)
    refused = [p for p in problems if "is a causal_lm setting" in p]
    assert refused == [
        f"experiments[1].{key}: is a causal_lm setting; this experiment's task is "
        "sequence_classification"
        for key in ("tokenize.block_size", "evaluate.prompts", "evaluate.top_p")
    ]
    # A classifier decodes nothing: not told to sample, as if it were a language model.
    assert not [p for p in problems if "decoding" in p]


def test_greedy_decoding_refuses_the_sampling_settings_it_would_ignore():
    def problems(**keys) -> list[str]:
        config = config_with(**keys)
        given = copy.deepcopy(config)
        return cross_checks(with_defaults(config), REPO, given)

    greedy = problems(
        experiments__0__evaluate__temperature=0.5, experiments__0__evaluate__top_p=0.9
    )
    assert [p for p in greedy if p.startswith("experiments[0].evaluate.temperature:")]
    assert [p for p in greedy if p.startswith("experiments[0].evaluate.top_p:")]
    sampled = problems(
        experiments__0__evaluate__temperature=0.5,
        experiments__0__evaluate__top_p=0.9,
        experiments__0__evaluate__decoding="sample",
    )
    assert not [p for p in sampled if "temperature" in p or "top_p" in p]


@pytest.mark.parametrize(
    ("train", "model", "key"),
    [
        ({"strategy": "fsdp"}, {}, "train.processes"),
        ({"strategy": "fsdp", "processes": 2}, {"arch": "lstm"}, "model.arch"),
        ({"strategy": "fsdp", "nodes": 2}, {"lora_rank": 4}, "model.lora_rank"),
        ({"strategy": "fsdp", "processes": 2, "early_stopping_patience": 2}, {}, "train.early"),
    ],
)
def test_fsdp_settings_that_cannot_work_are_refused_by_key(train, model, key):
    from snaketune.config import ConfigError, validated

    config = copy.deepcopy(DEFAULT_CONFIG)
    config["experiments"][0]["train"].update(train)
    config["experiments"][0]["model"].update(model)
    with pytest.raises(ConfigError, match=rf"experiments\[0\]\.{key}"):
        validated(config)
    fine = copy.deepcopy(DEFAULT_CONFIG)
    fine["experiments"][0]["train"].update(strategy="fsdp", processes=2)
    validated(fine)  # shards over two processes


def test_answer_settings_the_run_would_ignore_are_refused():
    from snaketune.config import ConfigError, validated

    plain = copy.deepcopy(DEFAULT_CONFIG)
    dataset = plain["datasets"]["support-demo"]
    del dataset["prompt_column"], dataset["response_column"]
    plain["experiments"][0]["evaluate"]["answer_examples"] = 10
    with pytest.raises(ConfigError, match=r"experiments\[0\]\.evaluate\.answer_examples: scores"):
        validated(plain)
    classifier = copy.deepcopy(DEFAULT_CONFIG)
    classifier["experiments"][1]["evaluate"] = {"decoding": "sample"}
    with pytest.raises(ConfigError, match=r"experiments\[1\]\.evaluate\.decoding: is a causal_lm"):
        validated(classifier)


PRETRAINED = {"init": "pretrained", "name_or_path": "some/model"}


@pytest.mark.parametrize(
    ("train", "model", "key", "says"),
    [
        ({}, {"quantization": "4bit"}, "model.quantization", "model.init is 'scratch'"),
        ({}, {**PRETRAINED, "quantization": "8bit"}, "model.quantization", "set model.lora_rank"),
        (
            {"device": "cpu"},
            {**PRETRAINED, "quantization": "4bit", "lora_rank": 8},
            "model.quantization",
            "need CUDA",
        ),
        (
            {},
            {**PRETRAINED, "quantization": "4bit", "lora_rank": 8, "save_merged": True},
            "model.save_merged",
            "round them away",
        ),
        ({}, {"save_merged": True}, "model.save_merged", "model.lora_rank is 0"),
        ({}, {"arch": "lstm", "dtype": "bfloat16"}, "model.dtype", "transformer settings"),
        (
            {},
            {**PRETRAINED, "quantization": "4bit", "lora_rank": 8},
            "model.quantization",
            "classifier",
        ),
    ],
    ids=["scratch", "full-fine-tune", "cpu", "merged", "no-adapter", "lstm", "classifier"],
)
def test_weights_settings_that_cannot_work_are_refused_by_key(train, model, key, says):
    """Quantized weights train only under adapters, on CUDA; a quantized model is not merged."""
    from snaketune.config import ConfigError, validated

    config = copy.deepcopy(DEFAULT_CONFIG)
    which = 1 if "classifier" in says else 0  # the demo's intent classifier
    config["experiments"] = [config["experiments"][which]]
    config["experiments"][0]["train"].update(train)
    config["experiments"][0]["model"] = {**config["experiments"][0]["model"], **model}
    for owned in ("n_layer", "n_embd", "n_head", "dropout") if "init" in model else ():
        config["experiments"][0]["model"].pop(owned)
    with pytest.raises(ConfigError, match=rf"experiments\[0\]\.{key}: .*{says}"):
        validated(config)


def test_evaluate_compile_follows_train_compile_unless_it_says_otherwise():
    from snaketune.config import validated
    from snaketune.evaluate.settings import eval_job
    from snaketune.settings import ConfigView

    def compiled(train, evaluate) -> bool | str:
        config = copy.deepcopy(DEFAULT_CONFIG)
        config["experiments"][0]["train"]["compile"] = train
        if evaluate is not None:
            config["experiments"][0]["evaluate"]["compile"] = evaluate
        view = ConfigView(validated(config), REPO)
        return eval_job(view, config["experiments"][0]["name"]).compile

    assert compiled(True, None) is True and compiled(False, None) is False
    assert compiled(True, False) is False and compiled(False, "max-autotune") == "max-autotune"
    (problem,) = schema_problems(config_with(experiments__0__evaluate={"compile": "fast"}))
    assert problem.startswith("experiments[0].evaluate.compile")


@pytest.mark.parametrize("preset", [None, *preset_names()])
def test_defaults_are_filled_as_snakemake_fills_them(preset):
    """validated() fills the schema's defaults itself (no schema file read through the
    checkout): the same config as Snakemake's validate makes, for config.yaml and each preset."""
    import yaml
    from snakemake.utils import update_config, validate

    from snaketune.config import with_defaults
    from snaketune.schema import config_schema

    config = copy.deepcopy(DEFAULT_CONFIG)
    if preset:
        update_config(config, yaml.safe_load((REPO / "presets" / f"{preset}.yaml").read_text()))
    theirs, ours = copy.deepcopy(config), copy.deepcopy(config)
    validate(theirs, str(SCHEMA))
    with_defaults(ours, config_schema())
    assert ours == theirs


def test_the_demo_s_data_stages_and_training_keep_their_keys_across_versions():
    """What keys a shared stage and a train job's settings: config.yaml's must not move when
    settings are only reorganised (a 0 default written as 0.0 moved them all, which reruns
    every user's data stages and training). A deliberate change updates these and says so in
    README's "Upgrading"."""
    import hashlib

    from snaketune.config import validated
    from snaketune.settings import ConfigView, to_json
    from snaketune.sharing import keys_of
    from snaketune.train.settings import train_job

    view = ConfigView(validated(copy.deepcopy(DEFAULT_CONFIG)), REPO)
    keys = {name: keys_of(view, name) for name in ("demo-lm", "demo-intent")}
    assert keys == {
        "demo-lm": {
            "clean": "support-demo-02fa869be9",
            "split": "support-demo-0ea8a07b2f",
            "tokenizer": "support-demo-a5cfb616b0",
            "tokenize": "support-demo-8fa22c5ea2",
        },
        "demo-intent": {
            "clean": "support-demo-7148637def",
            "split": "support-demo-80d7330a10",
            "tokenizer": "support-demo-f80819130a",
            "tokenize": "support-demo-1f6eb47f2d",
        },
    }
    trained = {
        name: hashlib.sha256(to_json(train_job(view, name)).encode()).hexdigest()[:12]
        for name in ("demo-lm", "demo-intent")
    }
    assert trained == {"demo-lm": "47a32eec8afc", "demo-intent": "8c7410ff2933"}

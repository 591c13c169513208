"""Checks of one experiment across its sections, made before any job: settings that cannot work
together, and settings given that the run would ignore. Each problem names its key and what to
set. What one section's dataclass can check alone, it checks itself (its stage's settings.py).

`given` is the experiment entry as the config wrote it, before the schema's defaults were filled
in: a key the user set and the run would not use is refused, never silently dropped.
"""

from __future__ import annotations

import json
from typing import Any

from snaketune.evaluate.settings import GREEDY
from snaketune.names import SAMPLING_KEYS
from snaketune.settings import AUTO
from snaketune.tasks import BY_NAME, task_of
from snaketune.tokenize.settings import ACROSS_DOCUMENTS, DOCUMENTS_APART, FAST_ENCODER, HF_ENCODER
from snaketune.train.positions import config_positions
from snaketune.train.settings import NO_QUANTIZATION, TRANSFORMERS

CHECKPOINT_OWNS = ("n_layer", "n_embd", "n_head", "dropout")
"""Model keys a pretrained checkpoint decides for itself."""


def experiment_problems(exp: dict[str, Any], given: dict[str, Any], where: str) -> list[str]:
    """Every problem of one experiment (defaults filled) whose raw entry is `given`."""
    return [
        f"{where}.{key}: {text}"
        for key, text in [
            *pretrained_problems(exp, given),
            *adapter_problems(given),
            *task_problems(exp, given),
            *context_problems(exp),
            *memory_retry_problems(exp, given),
            *encoder_problems(exp),
            *decoding_problems(exp, given),
            *strategy_problems(exp),
            *quantization_problems(exp),
        ]
    ]


def quantization_problems(exp: dict[str, Any]) -> list[tuple[str, str]]:
    """bitsandbytes' quantized weights run on CUDA only, and are not sharded by FSDP."""
    model, train = exp["model"], exp["train"]
    if model["quantization"] == NO_QUANTIZATION:
        return []
    problems = []
    if train["device"] == "cpu":
        problems.append(
            (
                "model.quantization",
                f"{model['quantization']} weights (bitsandbytes) need CUDA, and train.device "
                "is 'cpu': remove quantization, or train on a GPU",
            )
        )
    if train["strategy"] == "fsdp":
        problems.append(
            ("model.quantization", "quantized weights are not sharded by fsdp: use ddp")
        )
    if not task_of(exp["task"]).predicts_tokens:
        problems.append(
            (
                "model.quantization",
                "a classifier's adapters and head are saved merged into its weights, which "
                "quantized weights cannot take: train the classifier without quantization",
            )
        )
    return problems


def strategy_problems(exp: dict[str, Any]) -> list[tuple[str, str]]:
    """FSDP shards transformer blocks over several processes, and only what was tested."""
    train, model = exp["train"], exp["model"]
    if train["strategy"] != "fsdp":
        return []
    cannot = {
        "train.processes": (
            "fsdp shards over several processes; with processes x nodes = 1 it would do "
            "nothing: use ddp, or more processes",
            train["processes"] * train["nodes"] == 1,
        ),
        "model.arch": (
            "fsdp shards transformer blocks; the LSTM has none",
            model["arch"] == "lstm",
        ),
        "model.lora_rank": ("LoRA with fsdp is not supported: use ddp", model["lora_rank"] > 0),
        "train.compile": ("torch.compile with fsdp is not supported: use ddp", train["compile"]),
        "train.early_stopping_patience": (
            "early stopping keeps the best weights whole, which fsdp does not: use ddp",
            train["early_stopping_patience"] > 0,
        ),
    }
    return [(key, text) for key, (text, refused) in cannot.items() if refused]


def decoding_problems(exp: dict[str, Any], given: dict[str, Any]) -> list[tuple[str, str]]:
    """Sampling settings mean nothing to greedy decoding. Given to a task that does not own
    them (Task.own_keys), they are task_problems' to refuse."""
    if exp["evaluate"]["decoding"] != GREEDY:
        return []
    owned = task_of(exp["task"]).own_keys
    return [
        (
            f"evaluate.{key}",
            "applies to decoding 'sample'; evaluate.decoding is 'greedy' (the most likely token "
            f"each step): set decoding: sample, or remove {key}",
        )
        for key in SAMPLING_KEYS
        if key in set_keys(given, "evaluate") and f"evaluate.{key}" in owned
    ]


def encoder_problems(exp: dict[str, Any]) -> list[tuple[str, str]]:
    """The fast encoder makes causal_lm rows only (snaketune.tokenize.encoder)."""
    if not task_of(exp["task"]).predicts_tokens and exp["tokenize"]["encoder"] == FAST_ENCODER:
        return [
            (
                "tokenize.encoder",
                f"{FAST_ENCODER!r} encodes causal_lm text only: classification rows are truncated "
                f"with the model's special tokens, which tokenizers does; use {AUTO!r} or "
                f"{HF_ENCODER!r}",
            )
        ]
    return []


def memory_retry_problems(exp: dict[str, Any], given: dict[str, Any]) -> list[tuple[str, str]]:
    """Out-of-memory retries, and the search of batch_size auto, need one process: with
    several, the others would wait on the one out of memory. batch_size auto takes its examples
    per step from grad_accum."""
    train = exp["train"]
    several = train["processes"] * train["nodes"] > 1
    problems = []
    if "memory_retries" in set_keys(given, "train") and several:
        problems.append(
            (
                "train.memory_retries",
                f"is for one process; with train.processes {exp['train']['processes']} an "
                "out-of-memory step is an error at once (the other processes would wait on it): "
                "remove memory_retries, or lower batch_size and raise grad_accum",
            )
        )
    if train["batch_size"] == AUTO and several:
        problems.append(
            (
                "train.batch_size",
                "auto searches the micro-batch in one process (with several, the others would "
                "wait on the one out of memory): give batch_size as a number",
            )
        )
    elif train["batch_size"] == AUTO and train["grad_accum"] == 1:
        problems.append(
            (
                "train.batch_size",
                "auto takes the examples per step from train.grad_accum (as at batch_size 1), "
                "which is 1, so the micro-batch could only be 1 row: set grad_accum to the "
                "examples per step (e.g. 64)",
            )
        )
    return problems


def set_keys(given: dict[str, Any], section: str) -> set[str]:
    value = given.get(section) or {}
    return set(value) if isinstance(value, dict) else set()


def pretrained_problems(exp: dict[str, Any], given: dict[str, Any]) -> list[tuple[str, str]]:
    model, tokenizer = exp["model"], exp["tokenizer"]
    problems = []
    if model["init"] == "pretrained" and tokenizer["kind"] == "bpe":
        problems.append(
            (
                "tokenizer.kind",
                f"'bpe' trains a new vocabulary, which model {model['name_or_path']!r} has never "
                "seen (its embeddings would be resized and learned again): set tokenizer.kind: "
                f"pretrained and tokenizer.name_or_path: {model['name_or_path']}",
            )
        )
    if model["init"] == "pretrained":
        for key in sorted(set_keys(given, "model") & set(CHECKPOINT_OWNS)):
            problems.append(
                (
                    f"model.{key}",
                    "is ignored when model.init is 'pretrained' (the checkpoint's own value is "
                    "used); remove it",
                )
            )
    if tokenizer["kind"] == "pretrained":
        for key in sorted(set_keys(given, "tokenizer") & {"vocab_size", "min_frequency"}):
            problems.append(
                (
                    f"tokenizer.{key}",
                    "trains a BPE and is ignored when tokenizer.kind is 'pretrained'; remove it",
                )
            )
    return problems


def adapter_problems(given: dict[str, Any]) -> list[tuple[str, str]]:
    model = given.get("model") or {}
    if model.get("lora_rank"):
        return []
    return [
        (f"model.{key}", "is ignored while model.lora_rank is 0 (no adapters); set lora_rank")
        for key in sorted(set(model) & {"lora_alpha", "lora_dropout"})
    ]


def task_problems(exp: dict[str, Any], given: dict[str, Any]) -> list[tuple[str, str]]:
    """Keys that only another task uses (Task.own_keys)."""
    task = task_of(exp["task"])
    sections = {dotted.split(".")[0] for other in BY_NAME.values() for dotted in other.own_keys}
    given_keys = {f"{section}.{key}" for section in sections for key in set_keys(given, section)}
    return [
        (dotted, f"is a {other.name} setting; this experiment's task is {task.name}")
        for other in BY_NAME.values()
        if other is not task
        for dotted in other.own_keys
        if dotted in given_keys and dotted not in task.own_keys
    ]


def context_problems(exp: dict[str, Any]) -> list[tuple[str, str]]:
    """Windows the model can take: its positions (block_size when built here, the checkpoint's
    when pretrained), and strides that leave no token unscored."""
    model, tokenize, evaluate = exp["model"], exp["tokenize"], exp["evaluate"]
    problems = []
    if task_of(exp["task"]).predicts_tokens:
        asked = {"tokenize.block_size": tokenize["block_size"]}
        context = evaluate["context_length"] or tokenize["block_size"]
        if evaluate["context_length"]:
            asked["evaluate.context_length"] = context
        if context < 2:  # a window of one token predicts nothing and cannot advance
            problems.append(
                (
                    "evaluate.context_length",
                    f"{context} leaves no token to predict after another: give at least 2 (0 "
                    "means tokenize.block_size)",
                )
            )
        elif evaluate["stride"] >= context:
            problems.append(
                (
                    "evaluate.stride",
                    f"{evaluate['stride']} must be below the context length {context}: every "
                    "token needs one before it in its window",
                )
            )
        if (
            model["init"] == "scratch"
            and model["arch"] in TRANSFORMERS
            and context > tokenize["block_size"]
        ):
            problems.append(
                (
                    "evaluate.context_length",
                    f"{context} is above tokenize.block_size={tokenize['block_size']}, the "
                    "positions the model is built with",
                )
            )
    else:
        asked = {"tokenize.max_length": tokenize["max_length"]}
    positions = model_positions(model["name_or_path"]) if model["init"] == "pretrained" else None
    for key, length in asked.items():
        if positions is not None and length > positions:
            problems.append(
                (
                    key,
                    f"{length} tokens are more than model {model['name_or_path']!r} has "
                    f"positions for ({positions}); set it to at most {positions}",
                )
            )
    return problems


def model_positions(name_or_path: str) -> int | None:
    """The position count a checkpoint's config.json gives, if the checkpoint is on this machine
    (a folder, or the Hugging Face cache); None when it cannot be read here."""
    from snaketune.train.memory_plan import checkpoint_folder

    folder = checkpoint_folder(name_or_path)
    if folder is None:
        return None
    return config_positions(json.loads((folder / "config.json").read_text()))


def instruction_problems(
    exp: dict[str, Any], given: dict[str, Any], instruction: bool
) -> list[tuple[str, str]]:
    """Answers are generated and scored only for instruction data; packed examples (and
    documents_apart) are kept apart only by attention (snaketune.train.batches), which the LSTM has
    not; documents_apart is a plain-text packing."""
    if not task_of(exp["task"]).predicts_tokens:
        return []
    packing = exp["tokenize"]["packing"]
    if instruction and packing == DOCUMENTS_APART:
        return [
            (
                "tokenize.packing",
                "documents_apart is for plain text: packed instruction examples are always "
                "kept apart; set tokenize.packing: across_documents (or per_document)",
            )
        ]
    kept_apart = packing == (ACROSS_DOCUMENTS if instruction else DOCUMENTS_APART)
    if kept_apart and exp["model"]["arch"] == "lstm":
        return [
            (
                "model.arch",
                "the LSTM would carry its state from one packed "
                f"{'instruction example' if instruction else 'document'} into the next "
                f"(tokenize.packing: {packing}): set tokenize.packing: per_document, or train "
                "a transformer",
            )
        ]
    if instruction:
        return []
    if "answer_examples" not in set_keys(given, "evaluate"):
        return []
    return [
        (
            "evaluate.answer_examples",
            f"scores generated answers of instruction data; dataset {exp['dataset']!r} names no "
            "response_column or messages_column: set one, or remove answer_examples",
        )
    ]

"""The memory a train job will need, estimated before any job runs, from the experiment's
settings and the checkpoint's files alone (no weights loaded, no torch imported).

- weights: every parameter in the dtype it trains in (snaketune.train.models.weights_dtype);
  quantized linear weights at 4 or 8 bits (plus bitsandbytes' block scales), the rest as is;
- gradients and AdamW's two moments: for the parameters that train (all of them, or LoRA's
  adapters), in float32;
- activations: per micro-batch of batch_size rows of the configured context, what a decoder
  block keeps for the backward pass, per token: ACTIVATION_WIDTHS x the hidden and MLP widths,
  in the compute dtype (bf16 under autocast on a GPU, float32 on the CPU); with gradient
  checkpointing each block keeps only its input, and a block recomputed with its gradients
  (twice a block's worth) is live in the backward pass;
- logits: one chunk of positions of snaketune.train.lm_loss (its logits and their gradient), or the
  whole batch x context x vocabulary for a model that keeps its own forward;
- on CUDA, CUDA_RESERVE for the CUDA context and the allocator's slack.
Parameter counts come from the checkpoint's safetensors headers (exact), or for a model built
here from its sizes. A job whose total exceeds train.max_memory_gb, or the local GPU's memory,
is refused with the settings that would make it fit (snaketune.checks).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from snaketune.settings import AUTO
from snaketune.train.settings import LLAMA, TRANSFORMERS, llama_inner_width

GB = 1e9
CUDA_RESERVE = 1.0 * GB
ACTIVATION_WIDTHS = (18, 6)
"""What a block keeps for the backward pass and holds while it runs, per token, in widths of
the hidden and the MLP layer: norm inputs and outputs, q, k, v and their rotations, grouped
keys and values repeated per head, attention output, residuals; up, gate, activation,
product; fitted to the CPU's measured peak of Llama-shaped steps (tests/unit/test_memory_plan.py
keeps the estimate within 25% of it)."""
BYTES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I8": 1, "U8": 1, "BOOL": 1}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
QUANTIZED_BYTES = {"4bit": 0.5 + 0.5 / 64, "8bit": 1.0 + 4 / 4096}
"""Bytes per quantized weight: NF4 with an absmax per 64 weights (double quantization shrinks
it further), and LLM.int8 with a scale per row."""
LOGITS_CHUNK_BYTES = 256 * 2**20  # snaketune.train.lm_loss's (checked equal by a test)
NOT_IN_BLOCKS = ("embed", "wte", "wpe", "lm_head")
"""Name parts of the 2-D weights outside the blocks' linear layers (embeddings, the head)."""


@dataclass(frozen=True)
class Shape:
    """What the estimate needs of a model."""

    parameters: int
    linear_parameters: int
    """In the blocks' linear layers (what quantization shrinks)."""
    lora_parameters: int
    """LoRA's adapters at the configured rank on the targeted layers (0 without LoRA)."""
    hidden: int
    intermediate: int
    layers: int
    vocab: int


@dataclass(frozen=True)
class Plan:
    weights: float
    gradients: float
    optimizer: float
    activations: float
    logits: float
    reserve: float
    weights_dtype: str
    micro_batch: tuple[int, int]

    @property
    def total(self) -> float:
        return (
            self.weights
            + self.gradients
            + self.optimizer
            + self.activations
            + self.logits
            + self.reserve
        )

    def describe(self) -> str:
        parts = [
            f"weights {size(self.weights)} ({self.weights_dtype})",
            f"gradients {size(self.gradients)}",
            f"optimizer {size(self.optimizer)}",
            f"activations {size(self.activations)} (micro-batch {self.micro_batch[0]} x "
            f"{self.micro_batch[1]})",
            f"logits {size(self.logits)}",
        ]
        if self.reserve:
            parts.append(f"CUDA {size(self.reserve)}")
        return " + ".join(parts) + f" = {size(self.total)}"


def size(nbytes: float) -> str:
    return f"{nbytes / GB:.2f} GB" if nbytes >= GB else f"{nbytes / 1e6:.0f} MB"


def plan(shape: Shape, model: dict[str, Any], train: dict[str, Any], context: int, cuda: bool):
    """The plan of one train job (model and train: the experiment's sections)."""
    dtype = planned_dtype(model, cuda)
    weight_bytes = shape.parameters * DTYPE_BYTES[dtype]
    if model["quantization"] != "none":
        quantized = QUANTIZED_BYTES[model["quantization"]]
        weight_bytes -= shape.linear_parameters * (DTYPE_BYTES[dtype] - quantized)
    trainable = shape.lora_parameters if model["lora_rank"] else shape.parameters
    weight_bytes += shape.lora_parameters * 4 if model["lora_rank"] else 0
    if train["strategy"] == "fsdp":  # weights, gradients and moments split over processes
        share = train["processes"] * train["nodes"]
        weight_bytes, trainable = weight_bytes / share, trainable / share
    act_bytes = 2 if cuda else 4
    tokens = micro_rows(train) * context
    per_token_layer = (
        ACTIVATION_WIDTHS[0] * shape.hidden + ACTIVATION_WIDTHS[1] * shape.intermediate
    ) * act_bytes
    if model["gradient_checkpointing"]:
        # Each block's input, and in the backward pass one block recomputed with its gradients.
        activations = tokens * (shape.layers * shape.hidden * act_bytes + 2 * per_token_layer)
    else:
        activations = tokens * shape.layers * per_token_layer
    chunk = min(tokens, max(1, LOGITS_CHUNK_BYTES // (4 * shape.vocab)))
    logits = 2 * chunk * shape.vocab * 4 + tokens * shape.hidden * 4
    return Plan(
        weights=weight_bytes,
        gradients=trainable * 4,
        optimizer=2 * trainable * 4,
        activations=activations,
        logits=logits,
        reserve=CUDA_RESERVE if cuda else 0.0,
        weights_dtype=dtype if model["quantization"] == "none" else model["quantization"],
        micro_batch=(micro_rows(train), context),
    )


def micro_rows(train: dict[str, Any]) -> int:
    """Rows per micro-batch: batch_size auto needs at least one to fit (it searches upward from
    there when the job starts)."""
    return 1 if train["batch_size"] == AUTO else train["batch_size"]


def planned_dtype(model: dict[str, Any], cuda: bool) -> str:
    """snaketune.train.models.weights_dtype, as the settings say (a GPU is taken to have bf16)."""
    if model["dtype"] != "auto":
        return model["dtype"]
    adapters = model["init"] == "pretrained" and model["lora_rank"] > 0
    return "bfloat16" if adapters and cuda else "float32"


def fitting_changes(shape: Shape, model: dict, train: dict, context: int, cuda: bool, limit: float):
    """Settings that would bring the plan under `limit`, each alone: what a refusal suggests."""
    options = []
    if not model["lora_rank"] and model["init"] == "pretrained":
        options.append(("model.lora_rank: 16", {**model, "lora_rank": 16}, train))
    if model["lora_rank"] and model["quantization"] == "none" and cuda:
        options.append(("model.quantization: 4bit", {**model, "quantization": "4bit"}, train))
    if not model["gradient_checkpointing"]:
        options.append(
            ("model.gradient_checkpointing: true", {**model, "gradient_checkpointing": True}, train)
        )
    batch = micro_rows(train)
    while batch > 1:
        batch //= 2
        smaller = {
            **train,
            "batch_size": batch,
            "grad_accum": train["grad_accum"] * (train["batch_size"] // batch),
        }
        if plan(shape, model, smaller, context, cuda).total <= limit:
            options.append(
                (f"train.batch_size: {batch} (grad_accum {smaller['grad_accum']})", model, smaller)
            )
            break
    fits = []
    for text, m, t in options:
        shape_now = (
            shape
            if m["lora_rank"] == model["lora_rank"]
            else replace(shape, lora_parameters=lora_estimate(shape, m))
        )
        total = plan(shape_now, m, t, context, cuda).total
        if total <= limit:
            fits.append(f"{text} ({total / GB:.1f} GB)")
    return fits


def lora_estimate(shape: Shape, model: dict) -> int:
    """Adapters of rank r on the blocks' attention projections, about 2 x r x (in + out) on a
    quarter of the linear layers' inputs (q and v of Llama-like blocks)."""
    return int(2 * model["lora_rank"] * 2 * shape.hidden * shape.layers)


# --- shapes ------------------------------------------------------------------------------------


def scratch_shape(model: dict, vocab: int, context: int) -> Shape:
    """GPT-2 as snaketune.train.models builds it: tied head, learned positions, 4x MLP."""
    h, layers = model["n_embd"], model["n_layer"]
    linear = layers * (12 * h * h + 9 * h)
    parameters = linear + layers * 4 * h + vocab * h + context * h + 2 * h
    lora = 2 * model["lora_rank"] * (h + 3 * h) * layers if model["lora_rank"] else 0
    return Shape(parameters, linear, lora, h, 4 * h, layers, vocab)


def scratch_llama_shape(model: dict, vocab: int, context: int) -> Shape:
    """Llama as snaketune.train.lean_llama builds it: tied head, no biases, rotary positions (no
    table), a SwiGLU MLP; LoRA on peft's Llama targets (q_proj, v_proj)."""
    h, layers = model["n_embd"], model["n_layer"]
    inner = llama_inner_width(h)
    linear = layers * (4 * h * h + 3 * h * inner)
    parameters = linear + layers * 2 * h + vocab * h + h
    lora = 2 * model["lora_rank"] * 2 * h * layers if model["lora_rank"] else 0
    return Shape(parameters, linear, lora, h, inner, layers, vocab)


def checkpoint_shape(folder: Path, model: dict) -> Shape:
    """A checkpoint's exact parameters (its safetensors headers) and widths (config.json)."""
    config = json.loads((folder / "config.json").read_text())
    tensors = safetensors_shapes(folder)
    hidden = first(config, "hidden_size", "n_embd", "d_model")
    layers = first(config, "num_hidden_layers", "n_layer", "num_layers")
    intermediate = first(config, "intermediate_size", "n_inner", "ffn_dim") or 4 * hidden
    vocab = int(config["vocab_size"])
    parameters = sum(math.prod(shape) for shape in tensors.values())
    linear = sum(
        math.prod(shape)
        for name, shape in tensors.items()
        if len(shape) == 2 and not any(part in name for part in NOT_IN_BLOCKS)
    )
    targets = model["lora_target_modules"] or default_lora_targets(config.get("model_type", ""))
    lora = 0
    if model["lora_rank"]:
        for name, shape in tensors.items():
            module = name.removesuffix(".weight")
            if len(shape) == 2 and name.endswith(".weight") and module.split(".")[-1] in targets:
                lora += model["lora_rank"] * (shape[0] + shape[1])
    return Shape(parameters, linear, lora, hidden, intermediate, layers, vocab)


def first(config: dict, *keys: str) -> int:
    return next((int(config[k]) for k in keys if isinstance(config.get(k), int)), 0)


def default_lora_targets(model_type: str) -> list[str]:
    """peft's default target modules for the family (imported only here: it loads torch)."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    return list(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type, []))


def safetensors_shapes(folder: Path) -> dict[str, list[int]]:
    """Every tensor's shape, read from the headers of the folder's safetensors files."""
    index = folder / "model.safetensors.index.json"
    files = (
        sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
        if index.exists()
        else sorted(folder.glob("*.safetensors"))
    )
    shapes = {}
    for path in files:
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        shapes.update({k: v["shape"] for k, v in header.items() if k != "__metadata__"})
    return shapes


# --- one train job -------------------------------------------------------------------------


def job_shape(model: dict, vocab: int | None, context: int) -> Shape | None:
    """The shape of an experiment's model, or None: the LSTM, a model built here on a
    vocabulary not known yet (`vocab` None: a pretrained tokenizer's), or a checkpoint not on
    this machine (a hub id not in the cache says nothing until the job downloads it)."""
    if model["arch"] not in TRANSFORMERS:
        return None
    if model["init"] != "pretrained":
        if not vocab:
            return None
        build = scratch_llama_shape if model["arch"] == LLAMA else scratch_shape
        return build(model, vocab, context)
    folder = checkpoint_folder(model["name_or_path"])
    if folder is None or not safetensors_shapes(folder):
        return None
    return checkpoint_shape(folder, model)


def refusal(shape: Shape, model: dict, train: dict, context: int, cuda: bool, limit: float):
    """Why a plan over `limit` cannot run, and what would fit; None when it fits."""
    planned = plan(shape, model, train, context, cuda)
    if planned.total <= limit:
        return None
    fits = fitting_changes(shape, model, train, context, cuda, limit)
    advice = (
        f"; it would fit with {' or '.join(fits)}"
        if fits
        else (
            "; no single change of adapters, quantization, checkpointing or micro-batch makes it "
            "fit: combine them, or use a larger GPU"
        )
    )
    return f"needs about {planned.describe()}, over the {limit / GB:.1f} GB it may use{advice}"


def checkpoint_folder(name_or_path: str) -> Path | None:
    """The folder of a checkpoint on this machine: a local folder, or its snapshot in the
    Hugging Face cache."""
    local = Path(name_or_path).expanduser()
    if (local / "config.json").is_file():
        return local
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(name_or_path, "config.json")
    except ValueError:  # not a hub id either: the model stage will say what is missing
        return None
    return Path(cached).parent if isinstance(cached, str) else None

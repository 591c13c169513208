"""The models the trainer can build: GPT-2 style transformers (from scratch or a pretrained
path/hub id) and a small LSTM baseline, each for causal LM or sequence classification.

A scratch GPT-2 for causal LM is snaketune.train.lean_gpt's module (the same numbers, saved as the
same transformers GPT-2, and faster to train); with LoRA or a classifier head it is
transformers' own model, which peft and the classification head are written for.

Every model is called the same way, `model(input_ids=..., attention_mask=..., labels=...)`, and
returns an object with `.loss` and `.logits`, so training and evaluation need no branches.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from snaketune.errors import ModelError, not_loadable
from snaketune.settings import AUTO
from snaketune.tasks import task_of
from snaketune.train.settings import LLAMA, NO_QUANTIZATION, ModelSettings

LSTM_CONFIG = "snaketune_lstm.json"


@dataclass(frozen=True)
class LstmConfig:
    task: str
    vocab_size: int
    n_embd: int
    n_layer: int
    dropout: float
    pad_token_id: int
    num_labels: int = 0
    label_names: list[str] | None = None
    """Classification: the class of each output, as a transformers config's id2label."""


class LstmModel(nn.Module):
    """Embedding → LSTM → linear head: the classic baseline for both tasks."""

    def __init__(self, config: LstmConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.n_embd)
        self.lstm = nn.LSTM(
            config.n_embd,
            config.n_embd,
            config.n_layer,
            batch_first=True,
            dropout=config.dropout if config.n_layer > 1 else 0.0,
        )
        self.drop = nn.Dropout(config.dropout)
        out = task_of(config.task).head_size(config.vocab_size, config.num_labels)
        self.head = nn.Linear(config.n_embd, out)

    def forward(self, input_ids, attention_mask=None, labels=None):
        hidden, _ = self.lstm(self.drop(self.embed(input_ids)))
        hidden = self.drop(hidden)
        if task_of(self.config.task).predicts_tokens:
            logits = self.head(hidden)
            loss = None
            if labels is not None:
                loss = nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1)
                )
            return SimpleNamespace(logits=logits, loss=loss)
        # Classify from the hidden state at each example's last real token.
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        last = attention_mask.sum(dim=1).clamp(min=1) - 1
        logits = self.head(hidden[torch.arange(hidden.size(0)), last])
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SimpleNamespace(logits=logits, loss=loss)

    def next_token_logits(self, input_ids, state=None):
        """Logits of the token after `input_ids`, and the state to carry on from (causal LM)."""
        hidden, state = self.lstm(self.embed(input_ids), state)
        return self.head(hidden[:, -1]), state

    def save_pretrained(self, out_dir: Path) -> None:
        from safetensors.torch import save_file

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / LSTM_CONFIG).write_text(json.dumps(asdict(self.config), indent=2))
        save_file(
            {k: v.contiguous() for k, v in self.state_dict().items()}, out_dir / "model.safetensors"
        )


def attention_implementation(settings: ModelSettings, device_type: str) -> str:
    """'auto' is torch's fused attention everywhere: on CUDA by far the faster, and measured on
    2 CPU cores no slower than eager (0.97x its step time for GPT-2 2 x 128, the same within
    noise for 4 x 256)."""
    return "sdpa" if settings.attention == "auto" else settings.attention


def build_model(
    settings: ModelSettings,
    task: str,
    vocab_size: int,
    context: int,
    pad_token_id: int,
    eos_token_id: int | None,
    label_names: list[str],
    device_type: str = "cpu",
) -> nn.Module:
    attention = attention_implementation(settings, device_type)
    if settings.arch == "lstm":
        return LstmModel(
            LstmConfig(
                task,
                vocab_size,
                settings.n_embd,
                settings.n_layer,
                settings.dropout,
                pad_token_id,
                len(label_names),
                list(label_names) or None,
            )
        )
    labels = (
        {
            "num_labels": len(label_names),
            "id2label": dict(enumerate(label_names)),
            "label2id": {n: i for i, n in enumerate(label_names)},
        }
        if label_names
        else {}
    )
    dtype = weights_dtype(settings, device_type)
    if settings.init == "pretrained":
        refuse_growing_quantized(settings, vocab_size)
        model = _load_hf(
            settings.name_or_path,
            task,
            settings.trust_remote_code,
            attn_implementation=attention,
            dtype=dtype,
            **quantized_loading(settings.quantization, dtype),
            **labels,
        )
        if model.get_input_embeddings().num_embeddings < vocab_size:
            model.resize_token_embeddings(vocab_size)
        model.config.pad_token_id = pad_token_id
        return model
    if settings.arch == LLAMA:
        return scratch_llama(
            settings, task, vocab_size, context, pad_token_id, eos_token_id, attention, labels
        ).to(dtype)
    config = gpt2_config(
        settings, vocab_size, context, pad_token_id, eos_token_id, attention, **labels
    )
    if task_of(task).predicts_tokens and not settings.lora_rank:
        from snaketune.train.lean_gpt import LeanGPT

        return LeanGPT(config).to(dtype)
    # peft's adapters and the classifier head are transformers' own models.
    import transformers

    return getattr(transformers, task_of(task).gpt2_model)(config).to(dtype)


def scratch_llama(
    settings: ModelSettings,
    task,
    vocab_size,
    context,
    pad_token_id,
    eos_token_id,
    attention,
    labels,
) -> nn.Module:
    """model.arch llama from scratch: the lean Llama for a causal LM, transformers' Llama for
    LoRA adapters or a classifier (snaketune.train.lean_llama)."""
    from snaketune.train.lean_llama import LeanLlama, llama_config

    config = llama_config(
        settings, vocab_size, context, pad_token_id, eos_token_id, attention, **labels
    )
    if task_of(task).predicts_tokens and not settings.lora_rank:
        return LeanLlama(config)
    import transformers

    return getattr(transformers, task_of(task).llama_model)(config)


def refuse_growing_quantized(settings: ModelSettings, vocab_size: int) -> None:
    """Before the weights load: a grown embedding's new rows are in neither the base nor the
    adapter, so only a merged model would hold them, and quantized weights cannot be merged
    without rounding."""
    if settings.quantization == NO_QUANTIZATION:
        return
    rows = checkpoint_config(settings).vocab_size
    if rows < vocab_size:
        raise ModelError(
            f"the tokenizer has {vocab_size} tokens and checkpoint {settings.name_or_path!r} "
            f"embeds {rows}: its embedding would grow, and the new rows could be saved only "
            f"merged into the model.quantization {settings.quantization} weights, which "
            "rounds them away: use the checkpoint's own tokenizer (tokenizer.kind: pretrained, "
            "tokenizer.name_or_path: the checkpoint), or remove model.quantization"
        )


def weights_dtype(settings: ModelSettings, device_type: str) -> torch.dtype:
    """model.dtype: 'auto' is bf16 for the frozen base of adapters on a GPU with bf16 (half the
    memory, the numbers bf16 autocast computes anyway), else float32 (a full fine-tune keeps
    float32 master weights under autocast). A dtype the device lacks is refused."""
    if settings.dtype != AUTO:
        dtype = getattr(torch, settings.dtype)
        if dtype == torch.bfloat16 and device_type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ModelError(
                f"model.dtype bfloat16, and GPU {torch.cuda.get_device_name()} has no bf16: "
                "set model.dtype: float32 (training then computes in fp16 under autocast)"
            )
        return dtype
    frozen_base = settings.init == "pretrained" and settings.lora_rank > 0
    bf16 = device_type == "cuda" and torch.cuda.is_bf16_supported()
    return torch.bfloat16 if frozen_base and bf16 else torch.float32


def quantized_loading(quantization: str, dtype: torch.dtype) -> dict:
    """from_pretrained's arguments for model.quantization: bitsandbytes' NF4 with double
    quantization (QLoRA's recipe) computing in the weights' dtype, or LLM.int8, placed on this
    process's GPU (a quantized model cannot be moved after loading)."""
    if quantization == NO_QUANTIZATION:
        return {}
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
    return {"quantization_config": config, "device_map": {"": torch.cuda.current_device()}}


def is_quantized(model: nn.Module) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(base, "is_quantized", False))


def gpt2_config(
    settings: ModelSettings,
    vocab_size: int,
    context: int,
    pad_token_id: int,
    eos_token_id: int | None,
    attention: str,
    **extra,
):
    """The GPT-2 a scratch model is (and saves as), with the model settings' sizes; `extra`:
    a classifier's labels."""
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=vocab_size,
        n_positions=context,
        attn_implementation=attention,
        n_embd=settings.n_embd,
        n_layer=settings.n_layer,
        n_head=settings.n_head,
        resid_pdrop=settings.dropout,
        embd_pdrop=settings.dropout,
        attn_pdrop=settings.dropout,
        pad_token_id=pad_token_id,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
        **extra,
    )


def _load_hf(name_or_path: str, task: str, trust_remote_code: bool, **kwargs):
    # trust_remote_code stays False unless the config says otherwise: hub code runs on load.
    import transformers

    cls = getattr(transformers, task_of(task).auto_model)
    extra = dict(kwargs)
    if not task_of(task).predicts_tokens:
        extra["ignore_mismatched_sizes"] = True  # a new head for this label set
    try:
        return cls.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, **extra)
    except (OSError, ValueError) as err:
        raise ModelError(not_loadable("model", "model.name_or_path", name_or_path, err)) from err


def load_trained(model_dir: Path, task: str, device_type: str = "cpu") -> nn.Module:
    """Load what the trainer saved, whichever architecture it was: a base model and its
    adapter (adapter_base), or a whole model."""
    model_dir = Path(model_dir)
    if (model_dir / BASE_MODEL).exists():
        return load_with_adapter(model_dir, task, device_type)
    if (model_dir / LSTM_CONFIG).exists():
        from safetensors.torch import load_file

        config = LstmConfig(**json.loads((model_dir / LSTM_CONFIG).read_text()))
        model = LstmModel(config)
        model.load_state_dict(load_file(model_dir / "model.safetensors"))
        return model
    return _load_hf(str(model_dir), task, trust_remote_code=False)


def apply_lora(model: nn.Module, settings: ModelSettings, task: str) -> nn.Module:
    """Wrap the model with peft LoRA adapters; only adapters (and a classifier head) train.
    Over quantized weights, peft's preparation first (layer norms in float32, input gradients
    for checkpointing)."""
    if not settings.lora_rank:
        return model
    from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training

    if is_quantized(model):
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=settings.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )

    config = LoraConfig(
        task_type=TaskType[task_of(task).peft_task_type],
        r=settings.lora_rank,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=settings.lora_target_modules or None,
    )
    adapted = get_peft_model(model, config)
    for param in adapted.parameters():  # a classifier head copied from a bf16 base, say
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()  # AdamW's small steps would round away in bf16
    return adapted


def unwrap_for_saving(model: nn.Module) -> nn.Module:
    """The plain model to save: LoRA adapters merged in, so evaluation loads it like any other."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model


# --- adapters saved alone --------------------------------------------------------------------

BASE_MODEL = "adapter_base.json"
"""Beside peft's adapter files: the base model an adapter was trained on, and how it loaded."""


def saves_adapter_alone(settings: ModelSettings, task: str, model: nn.Module) -> bool:
    """LoRA on a pretrained causal LM keeps its adapter apart from the base, unless
    model.save_merged, or the embedding was grown for new tokens (its new rows are neither in
    the base nor in the adapter, so only a whole model holds them)."""
    if not (settings.lora_rank and settings.init == "pretrained" and task_of(task).predicts_tokens):
        return False
    if settings.save_merged:
        return False
    return model.get_input_embeddings().num_embeddings == checkpoint_config(settings).vocab_size


def checkpoint_config(settings: ModelSettings):
    """The pretrained checkpoint's transformers config (no weights read)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(
        settings.name_or_path, trust_remote_code=settings.trust_remote_code
    )


def save_adapter(model: nn.Module, settings: ModelSettings, out_dir: Path, source: str) -> None:
    """peft's adapter files (adapter_config.json, adapter_model.safetensors) and BASE_MODEL:
    the base's name or path, the content digest of a local base folder (`source`), and its
    dtype and quantization."""
    model.save_pretrained(out_dir)
    base = model.get_base_model()
    # The dtype it loaded in (peft's preparation of a quantized base casts some layers up).
    loaded_on = next(base.parameters()).device.type
    record = {
        "name_or_path": settings.name_or_path,
        "source_digest": source,
        "trust_remote_code": settings.trust_remote_code,
        "dtype": str(weights_dtype(settings, loaded_on)).removeprefix("torch."),
        "quantization": settings.quantization,
        "attention": base.config._attn_implementation,
        "pad_token_id": base.config.pad_token_id,
    }
    (Path(out_dir) / BASE_MODEL).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def load_with_adapter(model_dir: Path, task: str, device_type: str) -> nn.Module:
    """The base model an adapter names (refused when its local folder changed since training),
    and the adapter on it. Quantized as in training where CUDA is present, else in the
    recorded dtype."""
    from peft import PeftModel

    from snaketune.data.sources import FolderDigests, watched_folders

    record = json.loads((model_dir / BASE_MODEL).read_text())
    local = watched_folders({"name_or_path": record["name_or_path"]})
    if record["source_digest"] and local:
        now = FolderDigests().folder_digest(local[0])
        if now != record["source_digest"]:
            raise ModelError(
                f"the adapter in {model_dir} was trained on base model {local[0]}, whose "
                "files have changed since: restore them, or train again"
            )
    dtype = getattr(torch, record["dtype"])
    quantization = record["quantization"] if device_type == "cuda" else NO_QUANTIZATION
    base = _load_hf(
        record["name_or_path"],
        task,
        record["trust_remote_code"],
        attn_implementation=record["attention"],
        dtype=dtype,
        **quantized_loading(quantization, dtype),
    )
    base.config.pad_token_id = record["pad_token_id"]
    return PeftModel.from_pretrained(base, model_dir)


def count_parameters(model: nn.Module) -> int:
    """The saved model's parameters (the lean GPT's padded embedding rows are not saved)."""
    if hasattr(model, "real_parameter_count"):
        return model.real_parameter_count()
    return sum(p.numel() for p in model.parameters())

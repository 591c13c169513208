"""The model and the training run: an experiment's `model:` and `train:` sections, and the
train rule's job."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from snaketune.settings import AUTO, ConfigView, check_task, raise_problems, setting

WEIGHT_DTYPES = (AUTO, "float32", "bfloat16")


NO_QUANTIZATION = "none"


QUANTIZATIONS = (NO_QUANTIZATION, "4bit", "8bit")


GPT2, LLAMA, LSTM = ARCHS = ("gpt2", "llama", "lstm")


INITS = ("scratch", "pretrained")


ATTENTIONS = (AUTO, "eager", "sdpa")


STRATEGIES = ("ddp", "fsdp")


DEVICES = (AUTO, "cpu", "cuda")


PRECISIONS = (AUTO, "fp32", "bf16", "fp16")


TRANSFORMERS = (GPT2, LLAMA)
"""model.arch values that build transformers (the others: the LSTM baseline)."""


def llama_inner_width(width: int) -> int:
    """A scratch Llama's SwiGLU inner width: 8/3 of the model's (the MLP's parameters those of
    a 4x GELU MLP), rounded up to a multiple of 64."""
    return -(-8 * width // (3 * 64)) * 64


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
"""torch.compile's modes train.compile may name (true: "default")."""


def compile_mode(setting: bool | str) -> str | None:
    """train.compile as torch.compile's mode, or None: not compiled."""
    return COMPILE_MODES[0] if setting is True else (setting or None)


@dataclass(frozen=True)
class ModelSettings:
    SECTION: ClassVar[str] = "The network to train."

    arch: str = setting(
        GPT2,
        enum=ARCHS,
        description=(
            "gpt2: a transformer. Built here (init scratch) it is a GPT-2 of the sizes below; "
            "with init pretrained it is whatever family the checkpoint's config names (Llama, "
            "Qwen2, Mistral, Gemma, Phi, GPT-NeoX, BERT, ...: the architecture is read from the "
            "checkpoint, and the train manifest records it as model_type). llama (init "
            "scratch): a Llama of the sizes below (rotary positions, RMSNorm, SwiGLU MLP of 8/3 "
            "the width, no biases, tied head), saved as a transformers Llama. lstm: the LSTM "
            "baseline, built here."
        ),
    )
    init: str = setting(
        "scratch",
        enum=INITS,
        description="'scratch' uses the sizes below; 'pretrained' loads name_or_path.",
    )
    name_or_path: str | None = setting(
        None, description="Local directory or hub id of a pretrained model."
    )
    trust_remote_code: bool = setting(
        False, description="Allow code shipped with a hub model. Leave off unless you trust it."
    )
    n_layer: int = setting(
        2, minimum=1, maximum=128, description="Transformer blocks (or LSTM layers)."
    )
    n_embd: int = setting(
        128, minimum=8, maximum=16384, description="Hidden size; must be divisible by n_head."
    )
    n_head: int = setting(4, minimum=1, maximum=256, description="Attention heads.")
    dropout: float = setting(
        0.1,
        minimum=0,
        maximum=0.9,
        description=(
            "Dropout probability. It costs speed: on 2 CPU cores a step with 0 takes 0.78x the "
            "time of one with 0.1 (GPT-2 2 x 128 and 4 x 256 alike); large pretraining runs "
            "often use 0."
        ),
    )
    attention: str = setting(
        "auto",
        enum=ATTENTIONS,
        description=(
            "Attention kernel: 'sdpa' (torch's fused attention) or 'eager'; 'auto' is sdpa, the "
            "faster on CUDA and no slower on the CPU (measured: 0.97x eager's step time for "
            "GPT-2 2 x 128 on 2 cores)."
        ),
    )
    lora_rank: int = setting(
        0, minimum=0, description="LoRA adapter rank (peft); 0 trains every weight."
    )
    lora_alpha: int = setting(
        16, minimum=1, description="LoRA scaling numerator (the update is scaled by alpha / rank)."
    )
    lora_dropout: float = setting(
        0.05, minimum=0, maximum=0.9, description="Dropout on the LoRA path."
    )
    lora_target_modules: list[str] = setting(
        factory=list,
        description=(
            "Module names to adapt (e.g. [c_attn] for GPT-2); empty uses peft's default for the "
            "architecture."
        ),
    )
    gradient_checkpointing: bool = setting(
        False,
        description=(
            "Recompute each transformer block's activations in the backward pass instead of "
            "keeping them (transformers' gradient checkpointing): less activation memory for "
            "longer contexts or larger batches, about a third more compute; the same gradients. "
            "Not for the LSTM."
        ),
    )
    dtype: str = setting(
        AUTO,
        enum=WEIGHT_DTYPES,
        description=(
            "The weights' dtype. auto: bfloat16 for a pretrained model trained with LoRA "
            "adapters on a GPU that has bf16 (the frozen base at half the memory; the adapters "
            "stay float32), else float32 (a full fine-tune keeps float32 master weights and "
            "computes in bf16 under autocast on a GPU). bfloat16 asks for bf16 weights whatever "
            "the training (a full fine-tune then updates bf16 weights). The train manifest "
            "records the dtype and the parameter bytes by dtype."
        ),
    )
    quantization: str = setting(
        NO_QUANTIZATION,
        enum=QUANTIZATIONS,
        description=(
            "Load a pretrained checkpoint's frozen weights in 4 bits (NF4, double quantization, "
            "bf16 compute) or 8 bits with bitsandbytes, and train LoRA adapters over them "
            "(QLoRA): the usual way to fit 7-8B parameters on 24 GB. Needs model.init "
            "pretrained, model.lora_rank > 0 and CUDA with bitsandbytes installed "
            "(.venv/bin/pip install bitsandbytes); refused before any job otherwise, and with "
            "train.device cpu or train.strategy fsdp. Evaluation loads the base quantized as "
            "well where CUDA is present, else in model.dtype."
        ),
    )
    save_merged: bool = setting(
        False,
        description=(
            "LoRA on a pretrained causal LM saves the adapter alone (peft's format, a few MB) "
            "with the base model's identity (name_or_path and, for a local folder, its content "
            "digest); evaluation, serving and MLflow load the base and the adapter. true saves, "
            "logs and registers the whole model with the adapters merged in."
        ),
    )

    def __post_init__(self) -> None:
        problems = self.precision_problems()
        if self.arch == "lstm" and self.gradient_checkpointing:
            problems.append(
                ("gradient_checkpointing", "is a transformer setting; model.arch is 'lstm'")
            )
        if self.arch in TRANSFORMERS and self.n_embd % self.n_head:
            problems.append(
                ("n_embd", f"{self.n_embd} is not divisible by model.n_head={self.n_head}")
            )
        elif self.arch == LLAMA and (self.n_embd // self.n_head) % 2:
            problems.append(
                (
                    "n_embd",
                    f"rotary positions turn pairs of each head's {self.n_embd // self.n_head} "
                    "dimensions: make n_embd / n_head even",
                )
            )
        if self.arch == LLAMA and self.init == "pretrained":
            problems.append(
                (
                    "arch",
                    "llama builds a Llama here; a pretrained checkpoint's architecture is its "
                    "own (Llama's too): use model.arch: gpt2, which means a transformer",
                )
            )
        if self.init == "pretrained" and not self.name_or_path:
            problems.append(("name_or_path", "required when model.init is 'pretrained'"))
        if self.init == "scratch" and self.name_or_path:
            problems.append(
                (
                    "name_or_path",
                    "is set but model.init is 'scratch', which would ignore it: "
                    "set model.init: pretrained to fine-tune it",
                )
            )
        if self.arch == "lstm" and self.init == "pretrained":
            problems.append(
                (
                    "init",
                    "the LSTM baseline trains from scratch only; fine-tune a pretrained "
                    "checkpoint with model.arch: gpt2 (any AutoModel checkpoint loads)",
                )
            )
        if self.arch == "lstm" and self.attention != "auto":
            problems.append(("attention", "is a transformer setting; model.arch is 'lstm'"))
        if self.arch == "lstm" and self.lora_rank:
            problems.append(("lora_rank", "LoRA needs model.arch 'gpt2', not 'lstm'"))
        if self.save_merged and not self.lora_rank:
            problems.append(("save_merged", "merges LoRA adapters, and model.lora_rank is 0"))
        if not self.lora_rank and self.lora_target_modules:
            problems.append(
                (
                    "lora_target_modules",
                    "is set but model.lora_rank is 0, so no adapter would be made: set lora_rank",
                )
            )
        raise_problems(problems)

    def precision_problems(self) -> list[tuple[str, str]]:
        """The weights' dtype and quantization against the rest of the model section."""
        problems = []
        if self.dtype not in WEIGHT_DTYPES:
            problems.append(("dtype", f"{self.dtype!r} is not one of {WEIGHT_DTYPES}"))
        if self.quantization not in QUANTIZATIONS:
            problems.append(
                ("quantization", f"{self.quantization!r} is not one of {QUANTIZATIONS}")
            )
        if self.arch == "lstm" and (self.dtype != AUTO or self.quantization != NO_QUANTIZATION):
            problems.append(("dtype", "dtype and quantization are transformer settings"))
        if self.quantization == NO_QUANTIZATION:
            return problems
        if self.init != "pretrained":
            problems.append(
                ("quantization", "quantizes a pretrained checkpoint; model.init is 'scratch'")
            )
        if not self.lora_rank:
            problems.append(
                (
                    "quantization",
                    "quantized weights do not train: set model.lora_rank to train adapters "
                    "over them (QLoRA), or remove quantization for a full fine-tune",
                )
            )
        if self.save_merged:
            problems.append(
                (
                    "save_merged",
                    "merging adapters into quantized weights would round them away: keep the "
                    "adapter (save_merged: false), or train without quantization",
                )
            )
        return problems


@dataclass(frozen=True)
class TrainSettings:
    SECTION: ClassVar[str] = "Optimization settings (AdamW, linear warmup then cosine decay)."

    max_steps: int = setting(200, minimum=1, description="Optimizer steps.")
    batch_size: int | str = setting(
        16,
        oneOf=[{"type": "integer", "minimum": 1}, {"const": "auto"}],
        description=(
            "Rows per micro-batch, per process. 'auto' (one process) finds the largest "
            "micro-batch that fits before the first step: grad_accum is then the examples per "
            "step (as at batch_size 1), and its divisors from 2 rows up are tried with the "
            "widest rows (forward and backward of the eager model, beside room for the "
            "optimizer's moments; on the CPU within 80% of the memory available), doubling "
            "until one does not fit, then bisecting; the largest that fitted takes the steps, "
            "with grad_accum divided by it (the same "
            "examples per step, so the same trajectory), recorded in the train manifest's "
            "micro_batch. The search is made once per run (a resumed run keeps its result), and "
            "a first step that still runs out of memory is retried smaller (memory_retries)."
        ),
    )
    grad_accum: int = setting(
        1,
        minimum=1,
        description=(
            "Micro-batches per optimizer step (with batch_size auto: the examples per step)."
        ),
    )
    memory_retries: int = setting(
        4,
        minimum=0,
        description=(
            "How many times a step that runs out of memory is taken again with a smaller "
            "micro-batch and more micro-batches (the same batch per step, recorded in the train "
            "manifest); 0 makes it an error. Not with train.processes > 1."
        ),
    )
    max_memory_gb: float | None = setting(
        None,
        exclusiveMinimum=0,
        description=(
            "The memory (GB) a train job may plan to use. Before any job, each train job's "
            "memory is estimated from its settings and the checkpoint's files (weights by "
            "dtype, gradients, AdamW's moments, activations of one micro-batch at the "
            "configured context, one chunk of logits; train/memory_plan.py) and printed by "
            "a dry run (-n); a job whose estimate is above this, or, when null, above the "
            "memory of this machine's GPU where it trains on one, is refused with the settings "
            "that would make it fit (LoRA, 4-bit quantization, gradient checkpointing, a "
            "smaller micro-batch). The train manifest records the estimate beside the measured "
            "peak."
        ),
    )
    lr: float = setting(3e-3, exclusiveMinimum=0, maximum=1, description="Peak learning rate.")
    min_lr_ratio: float = setting(
        0.1, minimum=0, maximum=1, description="Final learning rate as a share of lr."
    )
    warmup_steps: int = setting(20, minimum=0, description="Linear warmup steps.")
    weight_decay: float = setting(
        0.01, minimum=0, description="AdamW weight decay (not on biases/norms)."
    )
    grad_clip: float = setting(1.0, exclusiveMinimum=0, description="Max global gradient norm.")
    eval_every: int = setting(50, minimum=1, description="Steps between validation losses.")
    log_every: int = setting(
        10,
        minimum=1,
        description=(
            "Steps between reads of the loss and gradient norm from the device (on CUDA each "
            "read waits for the GPU, so between reads the host queues the next steps). Every "
            "step is still in the history, with the tokens/s of its span; a step whose loss or "
            "gradient is not finite is skipped on the device and stops training at the next "
            "read, as does a SIGTERM. Evaluation and checkpoint steps are always read."
        ),
    )
    eval_rows: int = setting(
        4096,
        minimum=1,
        description=(
            "Validation rows per estimate (val loss and perplexity, or accuracy and macro-F1): "
            "the whole validation split when it has fewer. Lower it if evaluating takes too "
            "long on a large split."
        ),
    )
    checkpoint_every: int = setting(
        50, minimum=1, description="Steps between resumable checkpoints."
    )
    keep_checkpoints: int = setting(
        1,
        minimum=1,
        description=(
            "Checkpoints kept in train_state/: the latest and the keep - 1 before it "
            "(checkpoint-<step>.pt)."
        ),
    )
    keep_final_state: bool = setting(
        True,
        description=(
            "Keep the last checkpoint (weights and optimizer state) in train_state/ when "
            "training ends, so that a larger max_steps continues the finished run instead of "
            "starting over. Turn off to save the disk space (about three times the model)."
        ),
    )
    early_stopping_patience: int = setting(
        0,
        minimum=0,
        description=(
            "Stop after this many evaluations without a lower val loss and keep the best "
            "weights (0: off)."
        ),
    )
    compile: bool | str = setting(
        False,
        oneOf=[{"type": "boolean"}, {"enum": COMPILE_MODES}],
        description=(
            "torch.compile the training step's model, and the model that validation and the "
            "evaluate job score with (worth it on GPUs; slow to start on CPU). true is "
            "torch.compile's default mode; reduce-overhead adds CUDA graphs (for small models "
            "whose steps wait on the host), max-autotune also searches kernels (a longer first "
            "compile). Compiled graphs are cached in <results_dir>/shared/compile_cache "
            "(TORCHINDUCTOR_CACHE_DIR, when set, wins), so the next job of the same shape loads "
            "them; the manifests record the cache's hits and misses."
        ),
    )
    processes: int = setting(
        1,
        minimum=1,
        maximum=64,
        description=(
            "Processes for DistributedDataParallel through torchrun (NCCL on GPUs, gloo on "
            "CPU), per node; batch_size is per process."
        ),
    )
    nodes: int = setting(
        1,
        minimum=1,
        maximum=1024,
        description=(
            "Nodes, one torchrun agent each with train.processes processes, joined by a c10d "
            "rendezvous (train/launch.py): inside a SLURM job of that many tasks srun starts "
            "them, elsewhere they run on this machine over 127.0.0.1."
        ),
    )
    strategy: str = setting(
        "ddp",
        enum=STRATEGIES,
        description=(
            "With several processes (processes x nodes > 1): ddp keeps the whole model on each "
            "(DistributedDataParallel); fsdp shards parameters, gradients and optimizer state "
            "over them (PyTorch's FSDP2 fully_shard, each transformer block on its own), "
            "checkpoints the whole state (resumable on any number of processes) and saves a "
            "plain save_pretrained model. fsdp is for GPT-2 / transformers models, without "
            "LoRA, compile or early stopping."
        ),
    )
    seed: int = setting(1234, minimum=0, description="Seeds init, dropout and data order.")
    device: str = setting("auto", enum=DEVICES, description="'auto' uses CUDA when present.")
    precision: str = setting(
        "auto",
        enum=PRECISIONS,
        description=(
            "'auto' is bf16 autocast on a CUDA device that has bf16, fp16 with a gradient "
            "scaler on one that has not, fp32 on the CPU; 'bf16' or 'fp16' is refused where it "
            "cannot run."
        ),
    )
    threads: int = setting(
        0, minimum=0, description="CPU threads for torch (0 = the rule's threads)."
    )
    deterministic: bool | str = setting(
        "auto",
        oneOf=[{"type": "boolean"}, {"const": "auto"}],
        description=(
            "Deterministic kernels: exact resume and repeatable weights, slower on GPUs. 'auto' "
            "is on for the CPU and off on CUDA."
        ),
    )

    def __post_init__(self) -> None:
        problems = []
        if self.precision in ("bf16", "fp16") and self.device == "cpu":
            problems.append(
                (
                    "precision",
                    f"{self.precision!r} is autocast on CUDA; train.device is 'cpu', which "
                    "trains in fp32: set precision: fp32 (or auto), or device: cuda",
                )
            )
        if not isinstance(self.compile, bool) and self.compile not in COMPILE_MODES:
            problems.append(
                ("compile", f"must be true, false or one of {COMPILE_MODES}, not {self.compile!r}")
            )
        if self.batch_size != AUTO and not (
            isinstance(self.batch_size, int) and self.batch_size >= 1
        ):
            problems.append(
                ("batch_size", f"must be {AUTO!r} or an integer >= 1, not {self.batch_size!r}")
            )
        raise_problems(problems)

    @property
    def compile_mode(self) -> str | None:
        return compile_mode(self.compile)

    @property
    def searches_micro_batch(self) -> bool:
        return self.batch_size == AUTO

    @property
    def configured_shape(self) -> tuple[int, int]:
        """(rows per micro-batch, micro-batches per step) before any search or retry:
        batch_size auto starts from micro-batches of one row."""
        if self.searches_micro_batch:
            return 1, self.grad_accum
        return int(self.batch_size), self.grad_accum


@dataclass(frozen=True)
class TrainJob:
    task: str
    model: ModelSettings = field(default_factory=ModelSettings)
    train: TrainSettings = field(default_factory=TrainSettings)

    def __post_init__(self) -> None:
        check_task(self.task)


def train_job(view: ConfigView, experiment: str) -> TrainJob:
    return TrainJob(
        task=view.experiment(experiment)["task"],
        model=view.section(ModelSettings, experiment, "model"),
        train=view.section(TrainSettings, experiment, "train"),
    )

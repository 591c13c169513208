"""What do a LoRA fine-tune step's memory and time come to on our training path, for a Llama with
Llama 3's 128k vocabulary, against transformers' Trainer with peft, and what does each part
(bf16 base, chunked loss) bring?

One training step (forward, backward, gradient clipping, fused AdamW) of LoRA adapters (rank 16,
peft's default targets for Llama: q_proj and v_proj) on a frozen pretrained base, side by side in
one run, each with its base loaded in bf16 and in fp32:
- ours: what snaketune.train.trainer runs: models.build_model (model.init: pretrained,
  model.dtype) and apply_lora, snaketune.train.lm_loss.with_chunked_loss, make_optimizer, and the
  step itself, snaketune.train.trainer.one_step (forward with the placement of place("cpu", "auto"),
  clip_grad_norm_, the fused AdamW update), with deterministic kernels as the trainer sets on
  the CPU;
- ours, full logits: the same, but the steps call the peft model itself (the model's own
  forward with labels, whole logits): what the chunked loss saves;
- Trainer: transformers.Trainer on the peft model (get_peft_model with the same LoraConfig),
  the same batches in the same order, AdamW fused (adamw_torch_fused, betas 0.9/0.95), gradient
  clipping at 1.0, no autocast (bf16=False: the base's dtype is the only difference); a step is
  timed from the callbacks' on_step_begin to on_step_end;
- bare: the same peft model's body forward and backward with a trivial loss on its final hidden
  states (no head, no optimizer): the floor any step sits on.
Each variant runs in a fresh process: the model is loaded, a warm-up step taken, then the
kernel's peak RSS is reset (/proc/self/clear_refs) and --steps steps are timed (median); the peak
above the RSS before the timed steps is the step's own memory, and the process peak is the
largest RSS the process had at all (loading, warm-up and steps). The loss of the first step
shows that the variants compute the same thing: the same weights (a random Llama saved once
with save_pretrained, in fp32) and data; a bf16 base is those weights rounded, so its loss
differs from fp32's in the fourth or fifth digit.

The model: Llama 3.2 1B's shape at a quarter of its width and half its depth: hidden 512,
8 layers, 8 heads of 64 (2 key/value heads), MLP 2048, Llama 3's vocabulary of 128,256 with tied
embeddings: 96 M parameters. The vocabulary is kept whole because the loss over it is what the
chunked loss changes; the body is shrunk so that a step takes 1-3 s on 2 cores and the whole run
(8 variants) 2-3 min. The tied embedding and head are then two thirds of the parameters (a fifth
at 1B), so the head and the loss weigh more in a step here than at 1B.
Batch 4 x 256 tokens (labels = input ids): fp32 logits of 501 MB (MB: 2**20 bytes).

Run: .venv/bin/python bench/bench_lora_finetune.py [--batch 4] [--length 256] [--steps 5]
(~2-3 min on 2 cores, which must be otherwise idle for the step times to hold)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REFERENCE = ("ours", "bfloat16")
VARIANTS = (
    ("ours", "bfloat16"),
    ("ours", "float32"),
    ("ours, full logits", "bfloat16"),
    ("ours, full logits", "float32"),
    ("Trainer", "bfloat16"),
    ("Trainer", "float32"),
    ("bare (no head)", "bfloat16"),
    ("bare (no head)", "float32"),
)
SEED = 1234
LORA_RANK = 16


def llama_config(args):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.width,
        intermediate_size=args.width * 4,
        num_hidden_layers=args.layers,
        num_attention_heads=args.width // 64,
        num_key_value_heads=max(1, args.width // 256),
        max_position_embeddings=max(2048, args.length),
        tie_word_embeddings=True,
    )


def save_random_model(args, folder: Path) -> int:
    """A random Llama saved as a pretrained checkpoint (fp32); its parameter count."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(args))
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def token_rows(args):
    import torch

    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, args.vocab, (args.batch, args.length), generator=generator)


class Rows:
    """The training rows as trainer.one_step takes them (TokenRows' `batch`): the same
    args.batch rows every step, in the order batch_indices draws them."""

    def __init__(self, ids):
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, index):
        ids = self.ids[index]
        return {"input_ids": ids, "labels": ids.clone()}


def step_order(args, step: int):
    """The rows of step `step`, in the trainer's order (a seeded permutation per epoch)."""
    from snaketune.train.batches import batch_indices

    return batch_indices(step, 0, args.batch, 1, SEED, args.batch)


def rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


class Meter:
    """Resets the peak RSS after the warm-up step and times the steps after it."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.before_kb = 0
        self.process_peak_kb = 0
        self.started = 0.0

    def reset_peak(self) -> None:
        self.process_peak_kb = rss_kb("VmHWM")  # loading and the warm-up step
        self.before_kb = rss_kb("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM becomes the current RSS

    def begin(self) -> None:
        self.started = time.perf_counter()

    def end(self) -> None:
        self.times.append(time.perf_counter() - self.started)

    def result(self, first_loss: float, loaded_kb: int, loss_path: str) -> dict:
        peak = rss_kb("VmHWM")
        return {
            "peak_mb": (peak - self.before_kb) / 1024,
            "before_mb": self.before_kb / 1024,
            "process_peak_mb": max(peak, self.process_peak_kb) / 1024,
            "loaded_mb": loaded_kb / 1024,
            "seconds": statistics.median(self.times),
            "loss": first_loss,
            "loss_path": loss_path,
        }


def ours(args, dtype: str, chunked: bool) -> dict:
    """snaketune.train.trainer's set-up (prepare_run) and steps (one_step), on the CPU."""
    import torch

    from snaketune.names import CAUSAL_LM
    from snaketune.train import lm_loss, trainer
    from snaketune.train.devices import deterministic, place, set_deterministic
    from snaketune.train.distributed import World
    from snaketune.train.models import apply_lora, build_model
    from snaketune.train.settings import ModelSettings, TrainJob, TrainSettings

    # model.arch stays gpt2, the transformer family, under which any AutoModel checkpoint loads.
    model_settings = ModelSettings(
        init="pretrained", name_or_path=args.folder, lora_rank=LORA_RANK, dtype=dtype
    )
    settings = TrainSettings(
        max_steps=args.steps + 1, batch_size=args.batch, threads=args.threads, device="cpu"
    )
    job = TrainJob(task=CAUSAL_LM, model=model_settings, train=settings)
    torch.set_num_threads(settings.threads)
    placement = place(settings.device, settings.precision, 0)
    set_deterministic(deterministic(settings.deterministic, placement), settings.compile)
    trainer.seed_everything(settings.seed)
    config = llama_config(args)
    model = build_model(
        model_settings,
        CAUSAL_LM,
        args.vocab,
        args.length,
        config.eos_token_id,
        config.eos_token_id,
        [],
        placement.device.type,
    )
    trainer.check_positions(model, args.length, model_settings)
    model = apply_lora(model, model_settings, CAUSAL_LM).to(placement.device)
    step_model = lm_loss.with_chunked_loss(model) if chunked else model
    path = lm_loss.CHUNKED if step_model is not model else lm_loss.OWN_FORWARD
    if chunked and path != lm_loss.CHUNKED:
        raise RuntimeError(f"the {dtype} model does not take the chunked loss")
    run = trainer.Run(
        model=model,
        step_model=step_model,
        optimizer=trainer.make_optimizer(model, settings),
        train=Rows(token_rows(args)),
        val=None,
        job=job,
        state_dir=Path(args.folder),
        data_digest="",
        placement=placement,
        world=World(),
        loss=path,
    )
    loaded = rss_kb("VmHWM")
    schedule = [[0, settings.max_steps, None]]
    run.step_model.train()
    _, reading = trainer.one_step(run, 0, schedule)  # warm-up
    first_loss = float(reading[0])
    meter = Meter()
    meter.reset_peak()
    for step in range(1, args.steps + 1):
        meter.begin()
        _, reading = trainer.one_step(run, step, schedule)
        meter.end()
    trainer.refuse_non_finite(run, args.steps + 1, *reading.tolist())
    return meter.result(first_loss, loaded, path)


def with_trainer(args, dtype: str) -> dict:
    """transformers.Trainer on get_peft_model, as a user of the two would fine-tune."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_pretrained(
        args.folder, dtype=getattr(torch, dtype), attn_implementation="sdpa"
    )
    lora = LoraConfig(task_type=TaskType.CAUSAL_LM, r=LORA_RANK, lora_alpha=16, lora_dropout=0.05)
    model = get_peft_model(model, lora)
    ids = token_rows(args)
    order = [int(i) for step in range(args.steps + 1) for i in step_order(args, step)]
    dataset = [{"input_ids": ids[i], "labels": ids[i].clone()} for i in order]
    loaded = rss_kb("VmHWM")
    meter = Meter()
    losses: list[torch.Tensor] = []

    class Timing(TrainerCallback):
        def on_step_begin(self, args_, state, control, **kwargs):
            if state.global_step >= 1:
                meter.begin()

        def on_step_end(self, args_, state, control, **kwargs):
            if state.global_step == 1:  # the warm-up step
                meter.reset_peak()
            else:
                meter.end()

    class FirstLoss(Trainer):
        def training_step(self, *a, **k):
            loss = super().training_step(*a, **k)
            if not losses:
                losses.append(loss)
            return loss

    with tempfile.TemporaryDirectory() as out:
        training = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=args.batch,
            max_steps=args.steps + 1,
            learning_rate=3e-3,
            warmup_steps=1,
            weight_decay=0.01,
            adam_beta2=0.95,
            max_grad_norm=1.0,
            optim="adamw_torch_fused",
            use_cpu=True,
            bf16=False,
            seed=SEED,
            train_sampling_strategy="sequential",
            logging_strategy="no",
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            dataloader_pin_memory=False,
        )
        trainer = FirstLoss(model=model, args=training, train_dataset=dataset, callbacks=[Timing()])
        trainer.train()
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate's wrapper
    fused = [group.get("fused") for group in optimizer.param_groups]
    if not all(fused):
        raise RuntimeError(f"Trainer's AdamW is not fused: {fused}")
    if len(meter.times) != args.steps:
        raise RuntimeError(f"timed {len(meter.times)} Trainer steps, not {args.steps}")
    return meter.result(float(losses[0]), loaded, "model's own forward")


def bare(args, dtype: str) -> dict:
    """The same peft model's body, forward and backward, no head: the floor."""
    import torch

    from snaketune.names import CAUSAL_LM
    from snaketune.train.models import apply_lora, build_model
    from snaketune.train.settings import ModelSettings

    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    settings = ModelSettings(
        init="pretrained", name_or_path=args.folder, lora_rank=LORA_RANK, dtype=dtype
    )
    eos = llama_config(args).eos_token_id
    model = build_model(settings, CAUSAL_LM, args.vocab, args.length, eos, eos, [], "cpu")
    model = apply_lora(model, settings, CAUSAL_LM)
    body = model.get_base_model().model
    ids = token_rows(args)[step_order(args, 0)]
    model.train()

    def step() -> float:
        model.zero_grad(set_to_none=True)
        loss = body(input_ids=ids, use_cache=False).last_hidden_state.float().square().mean()
        loss.backward()
        return float(loss)

    loaded = rss_kb("VmHWM")
    first = step()
    meter = Meter()
    meter.reset_peak()
    for _ in range(args.steps):
        meter.begin()
        step()
        meter.end()
    return meter.result(first, loaded, "mean square of the hidden states")


def measure(args) -> dict:
    variant, dtype = args.variant, args.dtype
    if variant.startswith("ours"):
        return ours(args, dtype, chunked=variant == "ours")
    if variant == "Trainer":
        return with_trainer(args, dtype)
    return bare(args, dtype)


def run_variant(args, variant: str, dtype: str) -> dict:
    command = [
        sys.executable,
        __file__,
        "--one",
        variant,
        dtype,
        *("--folder", args.folder, "--batch", str(args.batch), "--length", str(args.length)),
        *("--vocab", str(args.vocab), "--width", str(args.width)),
        *("--layers", str(args.layers), "--steps", str(args.steps)),
        *("--threads", str(args.threads)),
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        sys.stderr.write(done.stderr)
        raise SystemExit(f"variant {variant} ({dtype}) failed (exit {done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


def load_average() -> str:
    """The 1, 5 and 15 minute load averages: other work on the cores skews every timing."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def label(variant: str, dtype: str) -> str:
    return f"{variant}, {'bf16' if dtype == 'bfloat16' else 'fp32'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=128_256)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--one", nargs=2, metavar=("VARIANT", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        args.variant, args.dtype = args.one
        print(json.dumps(measure(args)))
        return
    started, load_before = time.perf_counter(), load_average()
    with tempfile.TemporaryDirectory(prefix="bench_lora_") as folder:
        args.folder = folder
        parameters = save_random_model(args, Path(folder))
        logits_mb = args.batch * args.length * args.vocab * 4 / 2**20
        print(
            f"Llama {parameters / 1e6:.0f} M parameters (hidden {args.width}, {args.layers} "
            f"layers, vocabulary {args.vocab:,}, tied), LoRA r={LORA_RANK} on q_proj/v_proj; "
            f"batch {args.batch} x {args.length}: fp32 logits {logits_mb:,.0f} MB; "
            f"{args.threads} threads, {args.steps} timed steps each (median), fresh process each"
        )
        results = {(v, d): run_variant(args, v, d) for v, d in VARIANTS}
    ref = results[REFERENCE]
    print(
        f"{'variant':25} {'step peak MB':>12} {'RSS before':>10} {'load peak':>9} "
        f"{'process peak':>12} {'step s':>7} {'peak/ref':>9} {'time/ref':>9} {'loss of step 1':>15}"
    )
    for (variant, dtype), r in results.items():
        print(
            f"{label(variant, dtype):25} {r['peak_mb']:12.0f} {r['before_mb']:10.0f} "
            f"{r['loaded_mb']:9.0f} {r['process_peak_mb']:12.0f} {r['seconds']:7.3f} "
            f"{r['peak_mb'] / ref['peak_mb']:8.2f}x {r['seconds'] / ref['seconds']:8.2f}x "
            f"{r['loss']:15.6f}"
        )
    print(
        f"ref: {label(*REFERENCE)}; step peak: MB above the RSS before the timed steps; load "
        "peak: the process's peak RSS once the model is loaded; process peak: its peak RSS at all"
    )
    print("ours against Trainer, the same base dtype (Trainer / ours: above 1 is ours better):")
    for dtype in ("bfloat16", "float32"):
        us, them = results[("ours", dtype)], results[("Trainer", dtype)]
        print(
            f"  {'bf16' if dtype == 'bfloat16' else 'fp32'} base: step peak "
            f"{them['peak_mb'] / us['peak_mb']:.2f}x, process peak "
            f"{them['process_peak_mb'] / us['process_peak_mb']:.2f}x, step time "
            f"{them['seconds'] / us['seconds']:.2f}x"
        )
    us, them = results[("ours", "bfloat16")], results[("Trainer", "float32")]
    print(
        f"  ours bf16 against Trainer fp32 (its default load): step peak "
        f"{them['peak_mb'] / us['peak_mb']:.2f}x, process peak "
        f"{them['process_peak_mb'] / us['process_peak_mb']:.2f}x, step time "
        f"{them['seconds'] / us['seconds']:.2f}x"
    )
    for dtype in ("bfloat16", "float32"):
        losses = [
            r["loss"] for (v, d), r in results.items() if d == dtype and not v.startswith("bare")
        ]
        print(
            f"loss of step 1, {dtype} base: spread {max(losses) - min(losses):.2e} over ours, "
            "full logits and Trainer (same weights and batch)"
        )
    bf16, fp32 = results[("ours", "bfloat16")]["loss"], results[("ours", "float32")]["loss"]
    print(f"bf16 base - fp32 base (ours): {bf16 - fp32:+.2e} (the bf16 weights are rounded)")
    print(
        f"wall time {time.perf_counter() - started:.0f} s; load average before {load_before}, "
        f"after {load_average()} (the step times hold on an otherwise idle machine only)"
    )


if __name__ == "__main__":
    main()

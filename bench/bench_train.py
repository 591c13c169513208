"""How fast is our trainer? The same tiny GPT-2 config on the same token blocks, in one process:

1. ours: `snaketune.train.train_model` (the code the rule runs: load shards, train, save);
2. reference: `transformers.Trainer` with matching settings (batch, AdamW betas and weight
   decay, warmup + cosine to zero, grad clipping, steps, fp32 on CPU), then save_model.

Prints wall time, tokens/s, the ratio, and the final losses (mean of the last 20 steps).
Data: the demo corpus through our data stages (block_size tokens per row).

Run: .venv/bin/python bench/bench_train.py [--steps 200] [--batch-size 16] [--block-size 128]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def prepare_data(root: Path, block: int):
    from snaketune import local

    return local.prepare_data(local.demo_config("causal_lm", block), local.DEMO_EXPERIMENT, root)


def model_settings():
    from snaketune.settings import ModelSettings

    return ModelSettings(n_layer=2, n_embd=128, n_head=4, dropout=0.1, attention="sdpa")


def run_ours(data, out: Path, args) -> tuple[float, list[float], int]:
    from snaketune.settings import TrainJob, TrainSettings
    from snaketune.train import train_model

    settings = TrainSettings(
        max_steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        min_lr_ratio=0.0,
        warmup_steps=args.warmup,
        eval_every=args.steps,
        checkpoint_every=args.steps * 10,
        weight_decay=0.01,
        seed=1,
        compile=args.compile,
    )
    started = time.perf_counter()
    job = TrainJob(task="causal_lm", model=model_settings(), train=settings)
    history = train_model(data.train_paths(out), job)
    seconds = time.perf_counter() - started
    return seconds, [r["loss"] for r in history], args.steps * args.batch_size * args.block_size


class Blocks(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def __len__(self) -> int:
        return self.ids.size(0)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def run_reference(data, out: Path, args) -> tuple[float, list[float], int]:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from snaketune.batches import load_examples
    from snaketune.models import build_model

    info = json.loads(data.tokenize_manifest.read_text())
    losses: list[float] = []

    class RecordLoss(TrainerCallback):
        def on_log(self, _args, _state, _control, logs=None, **_):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    started = time.perf_counter()
    train = load_examples(data.shards / "train", "causal_lm", info["pad_token_id"])
    torch.manual_seed(1)
    model = build_model(
        model_settings(),
        "causal_lm",
        info["vocab_size"],
        args.block_size,
        info["pad_token_id"],
        info["eos_token_id"],
        [],
    )
    arguments = TrainingArguments(
        output_dir=str(out),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=args.warmup,
        weight_decay=0.01,
        adam_beta1=0.9,
        adam_beta2=0.95,
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        seed=1,
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model, args=arguments, train_dataset=Blocks(train.input_ids), callbacks=[RecordLoss()]
    )
    trainer.train()
    trainer.save_model(str(out / "model"))
    seconds = time.perf_counter() - started
    return seconds, losses, args.steps * args.batch_size * args.block_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--compile", action="store_true", help="torch.compile our model")
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = prepare_data(root / "data", args.block_size)
        reference = run_reference(data, root / "reference", args)
        ours = run_ours(data, root / "ours", args)

    print(
        f"tiny GPT-2 (2 x 128), {args.steps} steps of {args.batch_size} x {args.block_size} "
        f"tokens, fp32 CPU, {torch.get_num_threads()} threads"
    )
    print(f"{'trainer':<28}{'seconds':>9}{'tokens/s':>11}{'final loss':>12}")
    for label, (seconds, losses, tokens) in (
        ("ours: train_model", ours),
        ("reference: transformers.Trainer", reference),
    ):
        print(
            f"{label:<28}{seconds:>9.1f}{tokens / seconds:>11.0f}"
            f"{float(np.mean(losses[-20:])):>12.4f}"
        )
    final_ours, final_ref = np.mean(ours[1][-20:]), np.mean(reference[1][-20:])
    print(
        f"speed ours/Trainer: {reference[0] / ours[0]:.2f}x; final loss difference: "
        f"{100 * (final_ours - final_ref) / final_ref:+.1f}%"
    )


if __name__ == "__main__":
    main()

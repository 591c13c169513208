"""Is the lean GPT (train/lean_gpt.py, what scratch GPT-2 trains as) faster than transformers'
GPT2LMHeadModel of the same shape and weights?

Both take the same training step on the same random token batches: forward with labels,
backward, gradient clipping, fused AdamW with the trainer's parameter groups and schedule
(snaketune.train.trainer.make_optimizer, learning_rate). The steps run in alternating chunks in one
process (lean, transformers, lean, ...), so a slow spell of a shared machine slows both alike;
the median chunk counts. Before timing, one forward pass from the same weights with dropout off
shows that both compute the same loss.

The CPU figure says little about a GPU (there attention kernels, the padded vocabulary and
torch.compile matter more): bench/gpu_check.py measures that.

Run: .venv/bin/python bench/bench_lean_gpt.py [--layers 2] [--width 128] [--vocab 2003] (~25 s)
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np
import torch


def model_settings(args):
    from snaketune.train.settings import ModelSettings

    return ModelSettings(
        n_layer=args.layers,
        n_embd=args.width,
        n_head=args.heads,
        dropout=args.dropout,
        attention="sdpa",
    )


def train_settings(args):
    from snaketune.train.settings import TrainSettings

    steps = (args.rounds + 1) * args.chunk
    return TrainSettings(max_steps=steps, batch_size=args.batch, warmup_steps=5, seed=1)


def both_models(args, settings) -> dict[str, torch.nn.Module]:
    """The lean GPT as the trainer builds it, and GPT2LMHeadModel with its weights."""
    from transformers import GPT2LMHeadModel

    from snaketune.train.lean_gpt import to_hf_state
    from snaketune.train.models import build_model

    torch.manual_seed(1)
    lean = build_model(settings, "causal_lm", args.vocab, args.context, 0, 0, [])
    hf = GPT2LMHeadModel(lean.config)
    hf.load_state_dict(to_hf_state(lean.state_dict(), args.vocab))
    return {"lean GPT": lean.train(), "transformers GPT-2": hf.train()}


def stepper(model: torch.nn.Module, args):
    """One training step per call, on random windows drawn from a fixed seed (the same batches
    for both models)."""
    from snaketune.train.trainer import learning_rate, make_optimizer

    settings = train_settings(args)
    optimizer = make_optimizer(model, settings)
    rng = np.random.default_rng(1)

    def step(number: int) -> None:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(number, settings)
        ids = torch.from_numpy(rng.integers(0, args.vocab, (args.batch, args.context)))
        model(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def same_loss(args) -> tuple[float, float]:
    """Both models' loss on one batch from the same weights, dropout off."""
    models = both_models(args, replace(model_settings(args), dropout=0.0))
    ids = torch.from_numpy(np.random.default_rng(2).integers(0, args.vocab, (2, args.context)))
    with torch.no_grad():
        lean, hf = (float(m.eval()(input_ids=ids, labels=ids).loss) for m in models.values())
    return lean, hf


def interleaved(args) -> dict[str, float]:
    """Median ms per step of each model, stepped in alternating chunks (the first discarded:
    the first steps allocate)."""
    steps = {name: stepper(m, args) for name, m in both_models(args, model_settings(args)).items()}
    chunks: dict[str, list[float]] = {name: [] for name in steps}
    for round_ in range(args.rounds + 1):
        for name, step in steps.items():
            started = time.perf_counter()
            for i in range(args.chunk):
                step(round_ * args.chunk + i)
            chunks[name].append(time.perf_counter() - started)
    return {name: 1000 * float(np.median(c[1:])) / args.chunk for name, c in chunks.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=2003, help="not a multiple of 64: padded")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--chunk", type=int, default=5, help="steps of one model in a row")
    parser.add_argument("--rounds", type=int, default=6, help="timed chunks of each model")
    args = parser.parse_args()
    torch.set_num_threads(2)
    from snaketune.train.lean_gpt import padded_vocab

    lean_loss, hf_loss = same_loss(args)
    ms = interleaved(args)
    print(
        f"GPT-2 {args.layers} x {args.width}, {args.heads} heads, context {args.context}, vocab "
        f"{args.vocab:,} (lean pads to {padded_vocab(args.vocab):,}), batch {args.batch}, "
        f"dropout {args.dropout}, fp32 CPU, {torch.get_num_threads()} threads; steps in "
        f"alternating chunks of {args.chunk}, median of {args.rounds}"
    )
    print(f"{'model':<22}{'ms/step':>9}{'speed':>9}")
    reference = ms["transformers GPT-2"]
    for name in ("transformers GPT-2", "lean GPT"):
        print(f"{name:<22}{ms[name]:>9.1f}{reference / ms[name]:>8.2f}x")
    print(
        f"lean GPT: {reference / ms['lean GPT']:.2f}x the step speed of GPT2LMHeadModel; same "
        f"weights, dropout off: loss {lean_loss:.6f} vs {hf_loss:.6f} "
        f"(|diff| {abs(lean_loss - hf_loss):.1e})"
    )


if __name__ == "__main__":
    main()

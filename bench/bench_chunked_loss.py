"""What does the loss taken a chunk of positions at a time (train/lm_loss.py) save, for a model
with Llama 3's 128k vocabulary, and what does it cost?

One train step (forward with labels, backward) and one evaluation batch (each position's NLL and
whether its target ranked first), side by side in one run:
- ours: snaketune.train.lm_loss (ChunkedLoss for training, target_scores for evaluation);
- transformers: the model's own forward with labels (what run_clm.py and Trainer run), and its
  logits through cross_entropy for evaluation (what our evaluation did before);
- no head: the body alone, its hidden states summed: the floor any loss sits on.
Each variant runs in a fresh process: a warm-up step, then the kernel's peak RSS is reset
(/proc/self/clear_refs) and --steps steps are timed; the peak above the RSS before the steps is
the step's own memory. The model is a tiny Llama (random weights, fp32) whose head and
embedding dominate, as they do at 1B parameters.

Run: .venv/bin/python bench/bench_chunked_loss.py [--batch 4] [--length 512] (~1-2 min)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {
    "train": ("ours", "transformers", "no head"),
    "eval": ("ours", "transformers", "no head"),
}


def build(args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.width,
        intermediate_size=args.width * 8 // 3,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=args.length,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config)
    ids = torch.randint(0, args.vocab, (args.batch, args.length))
    return model, ids


def step_of(kind: str, variant: str, model, ids):
    """One call of what is measured."""
    import torch
    from torch.nn import functional as F

    from snaketune.train import lm_loss

    wrapped = lm_loss.with_chunked_loss(model)
    targets = lm_loss.next_token_targets(ids).clamp(min=0)

    def train_step():
        model.zero_grad(set_to_none=True)
        if variant == "ours":
            loss = wrapped(input_ids=ids, labels=ids).loss
        elif variant == "transformers":
            loss = model(input_ids=ids, labels=ids).loss
        else:
            loss = model.model(input_ids=ids).last_hidden_state.float().square().mean()
        loss.backward()
        return float(loss)

    @torch.no_grad()
    def eval_step():
        if variant == "ours":
            nll, top = lm_loss.target_scores(model, input_ids=ids, targets=targets)
        elif variant == "transformers":
            logits = model(input_ids=ids).logits.float()
            nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
            top = logits.argmax(-1) == targets
        else:
            nll = model.model(input_ids=ids).last_hidden_state.float().square().sum(-1)
            top = nll > 0
        return float(nll.sum()) + int(top.sum())

    return train_step if kind == "train" else eval_step


def rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    model, ids = build(args)
    model.train(args.kind == "train")
    step = step_of(args.kind, args.variant, model, ids)
    value = step()  # warm-up: gradients and allocator pools exist before the peak is reset
    before = rss_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {
        "peak_mb": (rss_kb("VmHWM") - before) / 1024,
        "seconds": statistics.median(times),
        "value": value,
    }


def run_variant(args, kind: str, variant: str) -> dict:
    command = [
        sys.executable,
        __file__,
        "--one",
        kind,
        variant,
        *("--batch", str(args.batch), "--length", str(args.length)),
        *("--vocab", str(args.vocab), "--width", str(args.width)),
        *("--layers", str(args.layers), "--steps", str(args.steps)),
        *("--threads", str(args.threads)),
    ]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=128_256)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", nargs=2, metavar=("KIND", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        args.kind, args.variant = args.one
        print(json.dumps(measure(args)))
        return
    logits_mb = args.batch * args.length * args.vocab * 4 / 2**20
    print(
        f"tiny Llama, vocabulary {args.vocab:,}, batch {args.batch} x {args.length}: "
        f"fp32 logits {logits_mb:,.0f} MB; {args.steps} timed steps each, fresh process each"
    )
    print(f"{'':6} {'variant':13} {'peak MB':>9} {'step s':>8} {'peak/ours':>10} {'time/ours':>10}")
    for kind, variants in VARIANTS.items():
        results = {v: run_variant(args, kind, v) for v in variants}
        ours = results["ours"]
        for variant, r in results.items():
            print(
                f"{kind:6} {variant:13} {r['peak_mb']:9.0f} {r['seconds']:8.3f} "
                f"{r['peak_mb'] / ours['peak_mb']:9.2f}x {r['seconds'] / ours['seconds']:9.2f}x"
            )
        gap = abs(results["ours"]["value"] - results["transformers"]["value"])
        print(f"{kind:6} |ours - transformers| of the measured value: {gap:.2e}")


if __name__ == "__main__":
    main()

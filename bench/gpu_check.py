"""One command for the day a GPU is at hand: is our trainer as fast as the GPU allows?

On CUDA, a GPT-2 124M shape (12 x 768, context 1024, vocab 50,257) on synthetic tokens:

1. bare: a nanoGPT-style loop (the same model built by snaketune.models, torch.compile, fused
   AdamW, bf16 autocast, random windows of the memory-mapped token array copied from pinned
   memory, the loss read once at the end);
2. ours: `snaketune.train.train_model`, as the rule runs it (train.compile, precision and
   attention at their GPU settings), on the same arrays;

then the tokens/s of each (after the first steps, which compile), ours vs bare, and the model
FLOPs utilisation: (6 x parameters + 12 x layers x width x context) FLOPs per token x tokens/s,
against the bf16 peak of a large matmul measured here and the device's published dense bf16
peak. Last, evaluation throughput: `snaketune.perplexity.score_lm` on the GPU.

Without CUDA the same code runs a tiny shape on the CPU in fp32 in seconds (what CI runs); its
figures say nothing about a GPU.

Run: .venv/bin/python bench/gpu_check.py [--shape auto|gpt2-124m|tiny] [--steps N]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

PUBLISHED_DENSE_BF16_TFLOPS = {  # vendors' datasheets, without sparsity
    "H200": 989.4,
    "H100 PCIe": 756.0,
    "H100": 989.4,  # SXM
    "A100": 312.0,
    "L40S": 362.1,
    "L4": 121.0,
}


@dataclass(frozen=True)
class Shape:
    name: str
    layers: int
    width: int
    heads: int
    context: int
    vocab: int
    batch: int
    steps: int
    train_rows: int
    eval_rows: int


SHAPES = {
    "gpt2-124m": Shape("GPT-2 124M", 12, 768, 12, 1024, 50257, 16, 200, 8192, 256),
    "tiny": Shape("tiny GPT-2", 2, 64, 2, 64, 512, 8, 30, 512, 32),
}


def synthetic_data(root: Path, shape: Shape):
    """The demo corpus through our data stages (for a real manifest and tokenizer), with each
    split's token arrays replaced by uniform random ids at the shape's vocabulary and context:
    throughput does not depend on what the tokens say."""
    from snaketune import local
    from snaketune.names import SPLITS, TRAIN
    from snaketune.tokenize.shards import OFFSETS, TOKENS, split_dir, token_dtype

    data = local.prepare_data(local.demo_config("causal_lm"), local.DEMO_EXPERIMENT, root)
    record = json.loads(data.tokenize_manifest.read_text())
    dtype = token_dtype(shape.vocab)
    record.update(vocab_size=shape.vocab, token_dtype=dtype)
    record["params"]["tokenize"]["block_size"] = shape.context
    data.tokenize_manifest.write_text(json.dumps(record))
    rng = np.random.default_rng(0)
    for split in SPLITS:
        rows = shape.train_rows if split == TRAIN else shape.eval_rows
        folder = split_dir(data.shards, split)
        rng.integers(0, shape.vocab, rows * shape.context).astype(dtype).tofile(folder / TOKENS)
        (np.arange(rows + 1, dtype=np.int64) * shape.context).tofile(folder / OFFSETS)
    return data


def model_settings(shape: Shape):
    from snaketune.settings import ModelSettings

    return ModelSettings(
        n_layer=shape.layers, n_embd=shape.width, n_head=shape.heads, dropout=0.0, attention="sdpa"
    )


def train_settings(shape: Shape, cuda: bool):
    from snaketune.settings import TrainSettings

    return TrainSettings(
        max_steps=shape.steps,
        batch_size=shape.batch,
        lr=6e-4,
        warmup_steps=10,
        eval_every=shape.steps,
        eval_rows=shape.eval_rows,
        checkpoint_every=shape.steps * 10,
        keep_final_state=False,
        compile=cuda,
        seed=1,
    )


def timed_steps(rows: list[dict], skip: int) -> float:
    """Median tokens/s of the history rows after the first `skip` steps (compilation)."""
    return float(np.median([r["tokens_per_s"] for r in rows[skip:]]))


def run_ours(data, out: Path, shape: Shape, cuda: bool) -> float:
    from snaketune.settings import TrainJob
    from snaketune.train import train_model

    job = TrainJob("causal_lm", model_settings(shape), train_settings(shape, cuda))
    history = train_model(data.train_paths(out), job)
    return timed_steps(history, shape.steps // 4)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_bare(data, shape: Shape, placement) -> tuple[float, torch.nn.Module]:
    from snaketune.batches import TokenRows
    from snaketune.models import build_model
    from snaketune.names import TRAIN
    from snaketune.tokenize.shards import TokenizedData
    from snaketune.train import learning_rate, make_optimizer

    tokenized = TokenizedData.read(data.tokenize_manifest, data.shards)
    stream = TokenRows.open(tokenized, TRAIN).stream()
    torch.manual_seed(1)
    args = (model_settings(shape), "causal_lm", shape.vocab, shape.context, 0, 0, [])
    model = build_model(*args, placement.device.type).to(placement.device).train()
    settings = train_settings(shape, placement.cuda)
    optimizer = make_optimizer(model, settings)
    step_model = torch.compile(model) if placement.cuda else model
    rng = np.random.default_rng(1)
    skip = shape.steps // 4
    loss = torch.zeros((), device=placement.device)
    for step in range(shape.steps):
        if step == skip:
            synchronize(placement.device)
            started = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, settings)
        begins = rng.integers(0, len(stream) - shape.context, shape.batch)
        ids = np.stack([stream[b : b + shape.context] for b in begins]).astype(np.int64)
        ids = torch.from_numpy(ids)
        if placement.cuda:
            ids = ids.pin_memory().to(placement.device, non_blocking=True)
        with placement.autocasting():
            loss = step_model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    loss.item()
    seconds = time.perf_counter() - started
    return (shape.steps - skip) * shape.batch * shape.context / seconds, model


def matmul_peak_tflops(placement) -> tuple[float, str]:
    """TFLOP/s of a large square matmul in the training precision, as this device runs it."""
    cuda = placement.cuda
    n = 8192 if cuda else 1024
    dtype = placement.autocast or torch.float32
    a = torch.randn(n, n, device=placement.device, dtype=dtype)
    b = torch.randn(n, n, device=placement.device, dtype=dtype)
    for _ in range(3):
        a @ b
    synchronize(placement.device)
    repeats = 20 if cuda else 5
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(placement.device)
    seconds = (time.perf_counter() - started) / repeats
    return 2 * n**3 / seconds / 1e12, f"{str(dtype).removeprefix('torch.')} {n}^3"


def published_peak(placement) -> float | None:
    if not placement.cuda:
        return None
    name = torch.cuda.get_device_name(placement.device)
    for key, tflops in PUBLISHED_DENSE_BF16_TFLOPS.items():  # the more specific names first
        if key in name:
            return tflops
    return None


def flops_per_token(model, shape: Shape) -> float:
    """6N for the matmuls' forward and backward (N without the position embeddings, a lookup;
    the tied output embedding counts once, as the lm_head matmul), plus attention's
    12 x layers x width x context (as nanoGPT and the PaLM paper count it)."""
    params = sum(p.numel() for n, p in model.named_parameters() if "wpe" not in n)
    return 6 * params + 12 * shape.layers * shape.width * shape.context


def eval_tokens_per_s(model, data, shape: Shape, placement) -> float:
    from snaketune.batches import TokenRows
    from snaketune.names import TEST
    from snaketune.perplexity import score_lm
    from snaketune.tokenize.shards import TokenizedData

    stream = TokenRows.open(TokenizedData.read(data.tokenize_manifest, data.shards), TEST).stream()
    lengths = np.ones(shape.vocab, np.int64)

    def score(tokens: np.ndarray) -> dict:
        context, batch = shape.context, shape.batch
        return score_lm(model, tokens, context, context - 1, batch, lengths, placement, 0)

    score(stream[: shape.context * shape.batch])  # warm-up: the first batches allocate
    synchronize(placement.device)
    started = time.perf_counter()
    result = score(stream)
    return result["predicted_tokens"] / (time.perf_counter() - started)


def main() -> None:
    from snaketune.devices import place

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=["auto", *SHAPES], default="auto")
    parser.add_argument("--steps", type=int, default=0, help="training steps (0: the shape's)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    shape = SHAPES[args.shape if args.shape != "auto" else ("gpt2-124m" if cuda else "tiny")]
    if args.steps:
        shape = replace(shape, steps=args.steps)
    placement = place("auto", "auto")
    with tempfile.TemporaryDirectory() as tmp:
        data = synthetic_data(Path(tmp) / "data", shape)
        bare, model = run_bare(data, shape, placement)
        ours = run_ours(data, Path(tmp) / "ours", shape, cuda)
        eval_speed = eval_tokens_per_s(model.eval(), data, shape, placement)
    measured, measured_how = matmul_peak_tflops(placement)
    published = published_peak(placement)
    per_token = flops_per_token(model, shape)
    name = torch.cuda.get_device_name(placement.device) if cuda else "CPU"
    print(f"device: {name}, {placement.describe()}, torch {torch.__version__}")
    print(
        f"shape: {shape.name} ({shape.layers} x {shape.width}, context {shape.context}, vocab "
        f"{shape.vocab:,}), batch {shape.batch}, {shape.steps} steps, SDPA"
        f"{', torch.compile' if cuda else ''}; {per_token / 1e6:,.1f} MFLOP per token"
    )
    print(
        f"matmul peak: {measured:.1f} TFLOP/s measured ({measured_how}); published dense bf16: "
        f"{f'{published:.1f} TFLOP/s' if published else 'not known for this device'}"
    )
    print(
        f"{'training':<20}{'tokens/s':>12}{'vs bare':>9}{'MFU measured':>14}{'MFU published':>15}"
    )
    for label, speed in (("bare torch loop", bare), ("ours: train_model", ours)):
        achieved = per_token * speed / 1e12
        print(
            f"{label:<20}{speed:>12,.0f}{speed / bare:>8.2f}x{100 * achieved / measured:>13.1f}%"
            f"{f'{100 * achieved / published:.1f}%' if published else 'n/a':>15}"
        )
    print(f"evaluation (score_lm, stride context - 1): {eval_speed:,.0f} tokens/s")
    if cuda:
        mfu = per_token * ours / 1e12 / (published or measured)
        print(
            f"targets: MFU >= 45%: {'yes' if mfu >= 0.45 else 'NO'} ({100 * mfu:.1f}%); "
            f"ours >= 0.95x bare: {'yes' if ours >= 0.95 * bare else 'NO'} ({ours / bare:.2f}x)"
        )


if __name__ == "__main__":
    main()

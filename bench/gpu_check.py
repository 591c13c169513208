"""One command for the day a GPU is at hand: is our trainer as fast as the GPU allows?

On CUDA, a GPT-2 124M shape (12 x 768, context 1024, vocab 50,257) on synthetic tokens, at
batch 16 and 32, for each of two models: the lean GPT (snaketune.lean_gpt, what scratch GPT-2
trains as) and transformers' GPT2LMHeadModel (what it trained as before), each trained by

1. bare: a nanoGPT-style loop (torch.compile, fused AdamW, bf16 autocast, random windows of the
   memory-mapped token array copied from pinned memory, the loss read once at the end);
2. ours: `snaketune.train.train_model`, as the rule runs it (train.compile, precision and
   attention at their GPU settings), on the same arrays;

then the tokens/s of each (after the first steps, which compile), against the bare loop over
GPT2LMHeadModel at the same batch, and the model FLOPs utilisation: (6 x parameters + 12 x
layers x width x context) FLOPs per token x tokens/s, the parameters GPT-2's (the lean model's
padded vocabulary rows do no useful work and are not counted), against the bf16 peak of a large
matmul measured here and the device's published dense bf16 peak. Last, evaluation throughput:
`snaketune.perplexity.score_lm` on the GPU. Each run starts from a fresh torch.compile (a
compile is 20-40 s at 124M; compiled graphs cached on disk make repeats faster); a run is not
started once --budget-s seconds have passed, so the whole check ends in bounded time, and the
table says which were skipped. --json PATH writes the table as JSON.

Without CUDA the same code runs a tiny shape on the CPU in fp32 in seconds (what CI runs); its
figures say nothing about a GPU.

Run: .venv/bin/python bench/gpu_check.py [--shape auto|gpt2-124m|tiny] [--steps N]
     [--batches 16,32] [--budget-s 200] [--models lean,hf] [--compile-mode MODE] [--json PATH]
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, replace
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
    # 80 steps: 20 to compile and settle, 60 timed (the median of six 10-step reads in ours).
    "gpt2-124m": Shape("GPT-2 124M", 12, 768, 12, 1024, 50257, 16, 80, 8192, 256),
    "tiny": Shape("tiny GPT-2", 2, 64, 2, 64, 500, 8, 30, 512, 32),  # vocab padded to 512
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


LEAN, HF = "lean GPT", "HF GPT-2"
MODEL_OPTIONS = {LEAN: "lean", HF: "hf"}
BARE, OURS = "bare torch loop", "ours: train_model"


def hf_gpt2(settings, task, vocab_size, context, pad_token_id, eos_token_id, labels, device="cpu"):
    """transformers' GPT2LMHeadModel with the config a scratch GPT-2 has (build_model's
    arguments), for the comparison: scratch GPT-2 itself trains as the lean GPT."""
    from transformers import GPT2LMHeadModel

    from snaketune.models import attention_implementation, gpt2_config

    attention = attention_implementation(settings, device)
    return GPT2LMHeadModel(
        gpt2_config(settings, vocab_size, context, pad_token_id, eos_token_id, attention)
    )


def model_builder(name: str):
    from snaketune.models import build_model

    return build_model if name == LEAN else hf_gpt2


def timed_steps(rows: list[dict], skip: int) -> float:
    """Median tokens/s of the history rows after the first `skip` steps (compilation)."""
    return float(np.median([r["tokens_per_s"] for r in rows[skip:]]))


def run_ours(data, out: Path, shape: Shape, cuda: bool, name: str) -> float:
    from unittest import mock

    from snaketune import train
    from snaketune.settings import TrainJob

    job = TrainJob("causal_lm", model_settings(shape), train_settings(shape, cuda))
    with mock.patch.object(train, "build_model", model_builder(name)):
        history = train.train_model(data.train_paths(out), job)
    return timed_steps(history, shape.steps // 4)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_bare(data, shape: Shape, placement, name: str, mode: str = "default") -> float:
    from snaketune.batches import TokenRows
    from snaketune.names import TRAIN
    from snaketune.tokenize.shards import TokenizedData
    from snaketune.train import learning_rate, make_optimizer

    tokenized = TokenizedData.read(data.tokenize_manifest, data.shards)
    stream = TokenRows.open(tokenized, TRAIN).stream()
    torch.manual_seed(1)
    args = (model_settings(shape), "causal_lm", shape.vocab, shape.context, 0, 0, [])
    model = model_builder(name)(*args, placement.device.type).to(placement.device).train()
    settings = train_settings(shape, placement.cuda)
    optimizer = make_optimizer(model, settings)
    step_model = torch.compile(model, mode=mode) if placement.cuda else model
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
    return (shape.steps - skip) * shape.batch * shape.context / seconds


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


@dataclass
class Result:
    model: str
    loop: str
    batch: int
    tokens_per_s: float | None = None
    """None: not run (the time budget was spent)."""
    seconds: float = 0.0
    """The whole run, compilation included."""


def fresh_compile(placement) -> None:
    """Each run compiles as a new process would (graphs cached on disk are reused), and a new
    batch size is not taken for a dynamic dimension; the previous run's memory is released."""
    torch._dynamo.reset()
    gc.collect()
    if placement.cuda:
        torch.cuda.empty_cache()


def run_all(data, root: Path, shape: Shape, placement, batches, args) -> list[Result]:
    """Every (batch, model, loop), printing each as it ends; none started after args.budget_s."""
    began = time.perf_counter()
    models = [m for m in (LEAN, HF) if MODEL_OPTIONS[m] in args.models.split(",")]
    results = []
    for batch in batches:
        at_batch = replace(shape, batch=batch)
        for name in models:
            for loop in (BARE, OURS):
                result = Result(name, loop, batch)
                results.append(result)
                if time.perf_counter() - began > args.budget_s:
                    continue
                fresh_compile(placement)
                started = time.perf_counter()
                if loop == BARE:
                    mode = args.compile_mode
                    result.tokens_per_s = run_bare(data, at_batch, placement, name, mode)
                else:
                    out = root / f"ours-{len(results)}"
                    result.tokens_per_s = run_ours(data, out, at_batch, placement.cuda, name)
                    shutil.rmtree(out, ignore_errors=True)  # 0.5 GB of weights at 124M
                result.seconds = time.perf_counter() - started
                print(
                    f"  {name}, {loop}, batch {batch}: {result.tokens_per_s:,.0f} tokens/s "
                    f"({result.seconds:.0f} s)",
                    flush=True,
                )
    return results


def mfu(tokens_per_s: float | None, per_token: float, peak: float | None) -> float | None:
    if tokens_per_s is None or not peak:
        return None
    return per_token * tokens_per_s / 1e12 / peak


def table_rows(results: list[Result], per_token: float, measured: float, published) -> list:
    reference = {r.batch: r.tokens_per_s for r in results if (r.model, r.loop) == (HF, BARE)}
    rows = []
    for r in results:
        base = reference.get(r.batch)
        rows.append(
            {
                **asdict(r),
                "vs_hf_bare": r.tokens_per_s / base if r.tokens_per_s and base else None,
                "mfu_measured_peak": mfu(r.tokens_per_s, per_token, measured),
                "mfu_published_peak": mfu(r.tokens_per_s, per_token, published),
            }
        )
    return rows


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def print_table(rows: list[dict]) -> None:
    print(
        f"{'model':<10}{'loop':<19}{'batch':>6}{'tokens/s':>12}{'vs HF bare':>11}"
        f"{'MFU measured':>14}{'MFU published':>15}"
    )
    for row in rows:
        speed = row["tokens_per_s"]
        ratio = row["vs_hf_bare"]
        print(
            f"{row['model']:<10}{row['loop']:<19}{row['batch']:>6}"
            f"{f'{speed:,.0f}' if speed else 'skipped':>12}"
            f"{f'{ratio:.2f}x' if ratio else 'n/a':>11}"
            f"{percent(row['mfu_measured_peak']):>14}{percent(row['mfu_published_peak']):>15}"
        )


def targets(rows: list[dict]) -> str:
    """The goal: >= 45% MFU of the published peak through our trainer (lean GPT), at 0.95x or
    more of the bare loop over the same model."""
    by_key = {(r["model"], r["loop"], r["batch"]): r for r in rows}
    parts = []
    for (name, loop, batch), row in by_key.items():
        ours, bare = row["tokens_per_s"], by_key[(name, BARE, batch)]["tokens_per_s"]
        if (name, loop) != (LEAN, OURS) or ours is None:
            continue
        share = row["mfu_published_peak"]
        ratio = f"{ours / bare:.2f}x" if bare else "bare not run"
        parts.append(
            f"batch {batch}: MFU >= 45%: {'yes' if share and share >= 0.45 else 'NO'} "
            f"({percent(share)}); ours >= 0.95x bare: "
            f"{'yes' if bare and ours >= 0.95 * bare else 'NO'} ({ratio})"
        )
    return "; ".join(parts) or "no lean GPT run through our trainer"


def compiled(cuda: bool, mode: str) -> str:
    if not cuda:
        return ""
    return ", torch.compile" + ("" if mode == "default" else f" (bare loop: mode {mode})")


def main() -> None:
    from snaketune.devices import place

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=["auto", *SHAPES], default="auto")
    parser.add_argument("--steps", type=int, default=0, help="training steps (0: the shape's)")
    parser.add_argument("--batches", default="", help="comma-separated (default 16,32 on CUDA)")
    parser.add_argument("--budget-s", type=float, default=200, help="no run starts after this")
    parser.add_argument("--models", default="lean,hf", help="which of lean,hf to train")
    parser.add_argument(
        "--compile-mode",
        default="default",
        help="torch.compile mode of the bare loop (ours compiles as train.compile does), to "
        "try e.g. max-autotune-no-cudagraphs (minutes more to compile)",
    )
    parser.add_argument("--json", type=Path, help="also write the table here as JSON")
    args = parser.parse_args()
    began = time.perf_counter()
    cuda = torch.cuda.is_available()
    shape = SHAPES[args.shape if args.shape != "auto" else ("gpt2-124m" if cuda else "tiny")]
    if args.steps:
        shape = replace(shape, steps=args.steps)
    batches = [int(b) for b in args.batches.split(",") if b] or (
        [16, 32] if shape.name == "GPT-2 124M" else [shape.batch]
    )
    placement = place("auto", "auto")
    measured, measured_how = matmul_peak_tflops(placement)
    published = published_peak(placement)
    with tempfile.TemporaryDirectory() as tmp:
        data = synthetic_data(Path(tmp) / "data", shape)
        results = run_all(data, Path(tmp), shape, placement, batches, args)
        fresh_compile(placement)
        torch.manual_seed(1)
        args_hf = (model_settings(shape), "causal_lm", shape.vocab, shape.context, 0, 0, [])
        reference = hf_gpt2(*args_hf, placement.device.type).to(placement.device)
        eval_speed = eval_tokens_per_s(reference.eval(), data, shape, placement)
    per_token = flops_per_token(reference, shape)
    rows = table_rows(results, per_token, measured, published)
    name = torch.cuda.get_device_name(placement.device) if cuda else "CPU"
    from snaketune.lean_gpt import padded_vocab

    header = [
        f"device: {name}, {placement.describe()}, torch {torch.__version__}",
        f"shape: {shape.name} ({shape.layers} x {shape.width}, context {shape.context}, vocab "
        f"{shape.vocab:,}; the lean GPT pads it to {padded_vocab(shape.vocab):,}), "
        f"{shape.steps} steps (the first {shape.steps // 4} not timed), SDPA"
        f"{compiled(cuda, args.compile_mode)}; {per_token / 1e6:,.1f} MFLOP per token",
        f"matmul peak: {measured:.1f} TFLOP/s measured ({measured_how}); published dense bf16: "
        f"{f'{published:.1f} TFLOP/s' if published else 'not known for this device'}",
    ]
    print("\n".join(header))
    print_table(rows)
    print(f"evaluation (score_lm, stride context - 1): {eval_speed:,.0f} tokens/s")
    if cuda:
        print(f"targets (lean GPT through train_model): {targets(rows)}")
    seconds = time.perf_counter() - began
    print(f"total: {seconds:.0f} s")
    if args.json:
        record = {
            "header": header,
            "device": name,
            "torch": torch.__version__,
            "shape": asdict(shape),
            "flops_per_token": per_token,
            "matmul_peak_tflops": measured,
            "published_peak_tflops": published,
            "rows": rows,
            "eval_tokens_per_s": eval_speed,
            "seconds": seconds,
        }
        args.json.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()

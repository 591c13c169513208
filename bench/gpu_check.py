"""One command for the day a GPU is at hand: is our trainer as fast as the GPU allows?

On CUDA, a GPT-2 124M shape (12 x 768, context 1024, vocab 50,257) on synthetic tokens, at
batch 16 and at train.batch_size: auto (the largest micro-batch that fits of 64 examples per
step), for each of two models: the lean GPT (snaketune.train.lean_gpt, what scratch GPT-2 trains as)
and transformers' GPT2LMHeadModel (what it trained as before), each trained by

1. bare: a nanoGPT-style loop (torch.compile, fused AdamW, bf16 autocast, random windows of the
   memory-mapped token array copied from pinned memory, the loss read once at the end), at
   batch auto with the micro-batch ours found;
2. ours: `snaketune.train.trainer.train_model`, as the rule runs it (train.compile, precision and
   attention at their GPU settings), on the same arrays;

then the tokens/s of each (after the first steps, which compile), against the bare loop over
GPT2LMHeadModel at the same batch, and the model FLOPs utilisation: (6 x parameters + 12 x
layers x width x context) FLOPs per token x tokens/s, the parameters GPT-2's (the lean model's
padded vocabulary rows do no useful work and are not counted), against the bf16 peak of a large
matmul measured here and the device's published dense bf16 peak. Each run starts from a fresh
torch.compile (a compile is 20-40 s at 124M); a training run is not started once --budget-s
seconds have passed, and the table says which were skipped.

Then, side by side: evaluation tokens/s (score_lm on HF GPT-2 as evaluation ran before the lean
GPT; on the lean GPT eager and compiled, as train.compile's evaluation runs; HF's forward with an
fp32 cross-entropy, eager and compiled: the loop users would write); a 5M-parameter classifier's
milliseconds per step through train_model; and two train jobs of the same shape against a fresh
compile cache (train.compile_cache): each one's seconds and the graphs it found or compiled.
--json PATH writes every figure as JSON.

Without CUDA the same code runs a tiny shape on the CPU in fp32 in seconds (what CI runs), with
the compiled rows and the compile cache left out; its figures say nothing about a GPU.

Run: .venv/bin/python bench/gpu_check.py [--shape auto|gpt2-124m|tiny] [--steps N]
     [--batches 16,auto] [--budget-s 150] [--models lean,hf] [--compile-mode MODE] [--json PATH]
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
    from snaketune.train.settings import ModelSettings

    return ModelSettings(
        n_layer=shape.layers, n_embd=shape.width, n_head=shape.heads, dropout=0.0, attention="sdpa"
    )


def train_settings(shape: Shape, cuda: bool):
    from snaketune.train.settings import TrainSettings

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

    from snaketune.train.models import attention_implementation, gpt2_config

    attention = attention_implementation(settings, device)
    return GPT2LMHeadModel(
        gpt2_config(settings, vocab_size, context, pad_token_id, eos_token_id, attention)
    )


def model_builder(name: str):
    from snaketune.train.models import build_model

    return build_model if name == LEAN else hf_gpt2


def timed_steps(rows: list[dict], skip: int) -> float:
    """Median tokens/s of the history rows after the first `skip` steps (compilation)."""
    return float(np.median([r["tokens_per_s"] for r in rows[skip:]]))


AUTO = "auto"
AUTO_STEP_EXAMPLES = 64
"""batch auto: the examples per step (train.grad_accum) whose largest micro-batch that fits
train.batch_size: auto finds."""


def run_ours(data, out: Path, shape: Shape, cuda: bool, name: str, batch=None) -> tuple:
    """Tokens/s of train_model, and the micro-batch it trained with (batch auto: the one its
    search found)."""
    from unittest import mock

    from snaketune.train import trainer as train
    from snaketune.train.settings import TrainJob

    settings = train_settings(shape, cuda)
    if batch == AUTO:
        settings = replace(settings, batch_size=AUTO, grad_accum=AUTO_STEP_EXAMPLES)
    job = TrainJob("causal_lm", model_settings(shape), settings)
    with mock.patch.object(train, "build_model", model_builder(name)):
        history = train.train_model(data.train_paths(out), job)
    found = json.loads(data.train_paths(out).manifest.read_text())["micro_batch"]
    return timed_steps(history, shape.steps // 4), found["batch_size"] if found else shape.batch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_bare(data, shape: Shape, placement, name: str, mode: str = "default") -> float:
    from snaketune.names import TRAIN
    from snaketune.tokenize.shards import TokenizedData
    from snaketune.train.batches import TokenRows
    from snaketune.train.trainer import learning_rate, make_optimizer

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


def eval_tokens_per_s(score, data, shape: Shape, placement) -> float:
    """Tokens/s of `score` (tokens -> how many it predicted) over the test split's stream,
    after a warm-up on its first windows (the first batches allocate, and a compiled model
    compiles)."""
    from snaketune.names import TEST
    from snaketune.tokenize.shards import TokenizedData
    from snaketune.train.batches import TokenRows

    stream = TokenRows.open(TokenizedData.read(data.tokenize_manifest, data.shards), TEST).stream()
    score(stream[: shape.context * shape.batch * 2])
    synchronize(placement.device)
    started = time.perf_counter()
    predicted = score(stream)
    synchronize(placement.device)
    return predicted / (time.perf_counter() - started)


def with_score_lm(model, shape: Shape, placement):
    """snaketune.evaluate.perplexity.score_lm over windows of the context, stride context - 1."""
    from snaketune.evaluate.perplexity import score_lm

    lengths = np.ones(shape.vocab, np.int64)
    context = shape.context

    def score(tokens: np.ndarray) -> int:
        scored = score_lm(model, tokens, context, context - 1, shape.batch, lengths, placement, 0)
        return scored["predicted_tokens"]

    return score


def with_hf_forward(model, shape: Shape, placement):
    """The reference users would write: the model's forward on windows of the context (the
    whole logits), then an fp32 cross-entropy, the NLL summed on the device."""
    from torch.nn import functional as F

    context, batch = shape.context, shape.batch

    @torch.no_grad()
    def score(tokens: np.ndarray) -> int:
        rows = len(tokens) // context
        ids = torch.from_numpy(np.asarray(tokens[: rows * context], np.int64)).view(rows, context)
        total = torch.zeros((), device=placement.device)
        for start in range(0, rows - batch + 1, batch):
            window = ids[start : start + batch].to(placement.device, non_blocking=True)
            with placement.autocasting():
                logits = model(input_ids=window).logits
            total += F.cross_entropy(
                logits[:, :-1].float().flatten(0, 1), window[:, 1:].flatten(), reduction="sum"
            )
        total.item()
        return (rows - rows % batch) * (context - 1)

    return score


def eval_rows(data, shape: Shape, placement) -> list[dict]:
    """Evaluation tokens/s over the test split: score_lm (chunked scores) on HF GPT-2, as
    evaluation ran it before the lean GPT; on the lean GPT, eager and compiled
    (train.compile's evaluation, lm_loss.scoring); and the reference loop, HF GPT-2's
    forward with an fp32 cross-entropy, eager and compiled. Compiled rows run on CUDA only (a
    CPU compile takes longer than this whole check)."""
    from snaketune.train import lm_loss
    from snaketune.train.models import build_model

    args = (model_settings(shape), "causal_lm", shape.vocab, shape.context, 0, 0, [])
    torch.manual_seed(1)
    hf = hf_gpt2(*args, placement.device.type).to(placement.device).eval()
    lean = build_model(*args, placement.device.type).to(placement.device).eval()
    cuda = placement.cuda
    runs = [
        ("score_lm, HF GPT-2, eager", lambda: with_score_lm(hf, shape, placement)),
        ("score_lm, lean GPT, eager", lambda: with_score_lm(lean, shape, placement)),
        (
            "score_lm, lean GPT, compiled",
            cuda and (lambda: with_score_lm(lm_loss.scoring(lean, "default"), shape, placement)),
        ),
        ("HF forward + fp32 CE, eager", lambda: with_hf_forward(hf, shape, placement)),
        (
            "HF forward + fp32 CE, compiled",
            cuda and (lambda: with_hf_forward(torch.compile(hf), shape, placement)),
        ),
    ]
    rows = []
    for what, scorer in runs:
        fresh_compile(placement)
        speed = eval_tokens_per_s(scorer(), data, shape, placement) if scorer else None
        rows.append({"evaluation": what, "tokens_per_s": speed})
    reference = rows[0]["tokens_per_s"]
    for row in rows:
        speed = row["tokens_per_s"]
        row["vs_score_lm_hf_eager"] = speed / reference if speed and reference else None
    return rows, hf


def print_eval_table(rows: list[dict]) -> None:
    print(f"{'evaluation (stride context - 1)':<34}{'tokens/s':>12}{'vs first':>10}")
    for row in rows:
        speed, ratio = row["tokens_per_s"], row["vs_score_lm_hf_eager"]
        print(
            f"{row['evaluation']:<34}{f'{speed:,.0f}' if speed else 'CUDA only':>12}"
            f"{f'{ratio:.2f}x' if ratio else 'n/a':>10}"
        )


CLASSIFIER = {"n_layer": 6, "n_embd": 256, "n_head": 4}
"""A 5M-parameter GPT-2 classifier: what a small model's step costs when the host sets its
pace."""


def classifier_ms_per_step(root: Path, placement, steps: int) -> tuple[float, int]:
    """Median milliseconds per step of the 5M classifier trained by train_model on the demo's
    intents (32 tokens a row, batch 32), after the first quarter of the steps; and its
    parameters."""
    from snaketune import local
    from snaketune.names import SEQUENCE_CLASSIFICATION
    from snaketune.train.settings import ModelSettings, TrainJob, TrainSettings
    from snaketune.train.trainer import train_model

    config = local.demo_config(SEQUENCE_CLASSIFICATION)
    data = local.prepare_data(config, local.DEMO_EXPERIMENT, root / "data")
    settings = TrainSettings(
        max_steps=steps,
        batch_size=32,
        eval_every=steps,
        checkpoint_every=steps * 10,
        keep_final_state=False,
        compile=placement.cuda,
        seed=1,
    )
    model = ModelSettings(**CLASSIFIER, dropout=0.1)
    out = root / "classifier"
    history = train_model(data.train_paths(out), TrainJob(SEQUENCE_CLASSIFICATION, model, settings))
    times = [r["timestamp"] for r in history[steps // 4 :]]
    parameters = json.loads(data.train_paths(out).manifest.read_text())["counts"]["parameters"]
    return 1000 * (times[-1] - times[0]) / max(1, len(times) - 1), parameters


def compile_cache_seconds(data, root: Path, shape: Shape, placement) -> list[dict] | None:
    """Two train jobs of the same shape (the lean GPT, 20 steps) against a fresh compile cache,
    as two jobs of a workflow or a sweep run: each job's seconds, compilation included, and
    what it found in the cache (CUDA only: on the CPU nothing compiles)."""
    import os

    from snaketune.train.compile_cache import CACHE_VARIABLE, usage

    if not placement.cuda:
        return None
    os.environ[CACHE_VARIABLE] = str(root / "compile-cache")
    jobs, before = [], usage()  # the compiles of the runs before these
    for name in ("first job", "second job"):
        fresh_compile(placement)
        out = root / name.replace(" ", "-")
        started = time.perf_counter()
        run_ours(data, out, replace(shape, steps=20), True, LEAN)
        recorded = json.loads(data.train_paths(out).manifest.read_text())["compile_cache"]
        # The counters are the process's, since its first compile: this job's part of them.
        graphs = {k: recorded["fx_graph"][k] - before["fx_graph"][k] for k in ("hits", "misses")}
        jobs.append({"job": name, "seconds": time.perf_counter() - started, "fx_graph": graphs})
        before = recorded
        shutil.rmtree(out, ignore_errors=True)
    return jobs


@dataclass
class Result:
    model: str
    loop: str
    batch: int | str
    """The micro-batch asked for: rows, or "auto" (train.batch_size: auto)."""
    tokens_per_s: float | None = None
    """None: not run (the time budget was spent)."""
    seconds: float = 0.0
    """The whole run, compilation included."""
    micro_batch: int | None = None
    """The rows per micro-batch it trained with."""


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
        at_batch = replace(shape, batch=shape.batch if batch == AUTO else batch)
        for name in models:
            # batch auto: ours searches the micro-batch, then the bare loop takes the same one.
            for loop in (OURS, BARE) if batch == AUTO else (BARE, OURS):
                result = Result(name, loop, batch)
                results.append(result)
                if time.perf_counter() - began > args.budget_s:
                    continue
                fresh_compile(placement)
                started = time.perf_counter()
                if loop == BARE:
                    mode = args.compile_mode
                    result.tokens_per_s = run_bare(data, at_batch, placement, name, mode)
                    result.micro_batch = at_batch.batch
                else:
                    out = root / f"ours-{len(results)}"
                    result.tokens_per_s, result.micro_batch = run_ours(
                        data, out, at_batch, placement.cuda, name, batch
                    )
                    at_batch = replace(at_batch, batch=result.micro_batch)
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
        f"{'model':<10}{'loop':<19}{'batch':>8}{'tokens/s':>12}{'vs HF bare':>11}"
        f"{'MFU measured':>14}{'MFU published':>15}"
    )
    for row in rows:
        speed = row["tokens_per_s"]
        ratio = row["vs_hf_bare"]
        batch = row["batch"] if row["batch"] != AUTO else f"auto {row['micro_batch'] or '?'}"
        print(
            f"{row['model']:<10}{row['loop']:<19}{batch:>8}"
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


def other_targets(evaluation: list[dict], classifier_ms: float) -> str:
    """Evaluation >= 2.5x score_lm as it ran before (HF GPT-2, eager); the 5M classifier
    <= 8 ms a step."""
    best = max((r["vs_score_lm_hf_eager"] or 0) for r in evaluation)
    return (
        f"evaluation >= 2.5x: {'yes' if best >= 2.5 else 'NO'} ({best:.2f}x); classifier <= 8 "
        f"ms a step: {'yes' if classifier_ms <= 8 else 'NO'} ({classifier_ms:.1f} ms)"
    )


def compiled(cuda: bool, mode: str) -> str:
    if not cuda:
        return ""
    return ", torch.compile" + ("" if mode == "default" else f" (bare loop: mode {mode})")


def main() -> None:
    from snaketune.train.devices import place

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=["auto", *SHAPES], default="auto")
    parser.add_argument("--steps", type=int, default=0, help="training steps (0: the shape's)")
    parser.add_argument(
        "--batches", default="", help="comma-separated rows or auto (default: 16,auto on CUDA)"
    )
    parser.add_argument(
        "--budget-s", type=float, default=150, help="no training run starts after this"
    )
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
    batches = [b if b == AUTO else int(b) for b in args.batches.split(",") if b] or [
        16 if shape.name == "GPT-2 124M" else shape.batch,
        AUTO,
    ]
    placement = place("auto", "auto")
    measured, measured_how = matmul_peak_tflops(placement)
    published = published_peak(placement)
    with tempfile.TemporaryDirectory() as tmp:
        data = synthetic_data(Path(tmp) / "data", shape)
        results = run_all(data, Path(tmp), shape, placement, batches, args)
        evaluation, reference = eval_rows(data, shape, placement)
        classifier_ms, classifier_parameters = classifier_ms_per_step(
            Path(tmp), placement, 300 if cuda else 20
        )
        compile_jobs = compile_cache_seconds(data, Path(tmp), shape, placement)
    per_token = flops_per_token(reference, shape)
    rows = table_rows(results, per_token, measured, published)
    name = torch.cuda.get_device_name(placement.device) if cuda else "CPU"
    from snaketune.train.lean_gpt import padded_vocab

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
    print_eval_table(evaluation)
    print(
        f"classifier ({classifier_parameters / 1e6:.1f}M parameters, batch 32 x 32 tokens, "
        f"train_model): {classifier_ms:.1f} ms per step"
    )
    if compile_jobs:
        print(
            "compile cache: "
            + "; ".join(
                f"{j['job']} {j['seconds']:.0f} s (FX graphs: {j['fx_graph']['hits']} found, "
                f"{j['fx_graph']['misses']} compiled)"
                for j in compile_jobs
            )
        )
    else:
        print("compile cache: CUDA only (nothing compiles on the CPU here)")
    if cuda:
        print(f"targets (lean GPT through train_model): {targets(rows)}")
        print(f"targets (evaluation, classifier): {other_targets(evaluation, classifier_ms)}")
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
            "evaluation": evaluation,
            "classifier_ms_per_step": classifier_ms,
            "classifier_parameters": classifier_parameters,
            "compile_cache": compile_jobs,
            "seconds": seconds,
        }
        args.json.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()

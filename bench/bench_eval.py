"""How fast is our perplexity, and is it the same number? One model, one token stream, in one
process, side by side:

1. ours: `snaketune.evaluate.perplexity.score_lm`, the code the evaluate rule runs (windows batched,
   fp32 cross-entropy summed in float64, the stream read from the memory-mapped token array);
2. reference: the loop of Hugging Face's "Perplexity of fixed-length models" guide (one window
   per forward pass, the loss of each window times its target count), on the same stream;
3. limit: the same batched windows through the model and nothing else (no loss, no sums);
4. compiled: score_lm as the evaluate rule runs it with train.compile (lm_loss.scoring:
   the model's final hidden states through torch.compile), timed after a first pass compiled
   every window shape; its perplexity must equal ours to 1e-5.

With stride = context - 1 (our default) consecutive windows share one token and both loops
predict every token once; the values must agree to 1e-6 relative. The reference counts one
target more than it predicts (the first window's first token, which nothing predicts: its
`trg_len` is the window's length), which the last column shows; ours counts each predicted
token once at every stride. Ratios are speeds: ours/ref = reference seconds / our seconds,
compiled/ours = our seconds / compiled seconds.
Data: the demo corpus through our data stages (the train split as the stream).

Run: .venv/bin/python bench/bench_eval.py [--context 128] [--tokens 60000] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from snaketune import local
from snaketune.evaluate.evaluation import CPU
from snaketune.evaluate.perplexity import score_lm, windows
from snaketune.names import TRAIN
from snaketune.tokenize.shards import TokenizedData
from snaketune.train import lm_loss
from snaketune.train.batches import TokenRows
from snaketune.train.models import build_model
from snaketune.train.settings import ModelSettings


def reference(model, stream: torch.Tensor, context: int, stride: int) -> tuple[float, int]:
    """The guide's loop, as published: (sum of window loss x trg_len, counted tokens)."""
    nll_sum, counted, prev_end = 0.0, 0, 0
    for begin in range(0, stream.size(0), stride):
        end = min(begin + context, stream.size(0))
        trg_len = end - prev_end
        ids = stream[begin:end][None]
        targets = ids.clone()
        targets[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids=ids, labels=targets).loss
        nll_sum += float(loss) * trg_len
        counted += trg_len
        prev_end = end
        if end == stream.size(0):
            break
    return nll_sum, counted


def limit(model, stream: np.ndarray, context: int, stride: int, batch_size: int) -> None:
    spans = [w for w in windows(len(stream), context, stride) if w[1] - w[0] == context]
    with torch.no_grad():
        for i in range(0, len(spans), batch_size):
            ids = np.stack([stream[b:e] for b, e, _ in spans[i : i + batch_size]])
            model(input_ids=torch.from_numpy(ids.astype(np.int64)))


REPEATS = 3


def timed(run, *args):
    """The best of REPEATS runs: on a shared 2-core machine one run can be 30% off."""
    best = math.inf
    for _ in range(REPEATS):
        started = time.perf_counter()
        result = run(*args)
        best = min(best, time.perf_counter() - started)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=60_000)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        config = local.demo_config("causal_lm", block_size=args.context, vocab_size=2000)
        data = local.prepare_data(config, local.DEMO_EXPERIMENT, Path(tmp))
        tokenized = TokenizedData.read(data.tokenize_manifest, data.shards)
        stream = TokenRows.open(tokenized, TRAIN).stream()[: args.tokens]
        torch.manual_seed(0)
        settings = ModelSettings(n_layer=2, n_embd=128, n_head=4, dropout=0.0)
        model = build_model(
            settings, "causal_lm", tokenized.vocab_size, args.context, 1, 0, []
        ).eval()
        eos, lengths = tokenized.eos_token_id, np.zeros(tokenized.vocab_size, np.int64)
        prefixed = torch.from_numpy(np.concatenate([[eos], stream]).astype(np.int64))
        with torch.no_grad():  # the first forward pass allocates; time none of it
            model(input_ids=prefixed[None, : args.context])
            model(input_ids=prefixed[: args.context * args.batch_size].view(args.batch_size, -1))
        rows = []
        for stride in (args.context - 1, args.context // 2):
            ours_s, ours = timed(
                score_lm, model, stream, args.context, stride, args.batch_size, lengths, CPU, eos
            )
            ref_s, (ref_nll, ref_count) = timed(reference, model, prefixed, args.context, stride)
            limit_s, _ = timed(
                limit, model, prefixed.numpy(), args.context, stride, args.batch_size
            )
            scorer = lm_loss.scoring(model, "default")
            compiled_args = (scorer, stream, args.context, stride, args.batch_size, lengths)
            score_lm(*compiled_args, CPU, eos)  # compiles each window shape
            compiled_s, compiled = timed(score_lm, *compiled_args, CPU, eos)
            assert abs(compiled["perplexity"] / ours["perplexity"] - 1) < 1e-5
            rows.append((stride, ours_s, ours, ref_s, ref_nll, ref_count, limit_s, compiled_s))

    print(
        f"GPT-2 2 x 128 (random weights), {len(stream):,} tokens, context {args.context}, "
        f"batch {args.batch_size}, fp32 CPU, {torch.get_num_threads()} threads, best of {REPEATS}"
    )
    print(
        f"{'stride':>7}{'ours s':>9}{'reference s':>13}{'limit s':>9}{'compiled s':>12}"
        f"{'ours/ref':>10}{'ours/limit':>12}{'compiled/ours':>15}{'ours ppl':>12}{'ref ppl':>12}"
        f"{'rel diff':>10}{'ref counted':>13}"
    )
    for stride, ours_s, ours, ref_s, ref_nll, ref_count, limit_s, compiled_s in rows:
        ref_ppl = math.exp(ref_nll / ref_count)
        print(
            f"{stride:>7}{ours_s:>9.2f}{ref_s:>13.2f}{limit_s:>9.2f}{compiled_s:>12.2f}"
            f"{ref_s / ours_s:>9.2f}x{limit_s / ours_s:>11.2f}x{ours_s / compiled_s:>14.2f}x"
            f"{ours['perplexity']:>12.4f}{ref_ppl:>12.4f}"
            f"{abs(ours['perplexity'] - ref_ppl) / ref_ppl:>10.1e}"
            f"{ref_count:>8} of {ours['predicted_tokens']}"
        )


if __name__ == "__main__":
    main()

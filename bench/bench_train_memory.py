"""Does a training job's memory grow with the corpus? The same job on 1x, 10x and 100x the
training tokens, side by side in one run: peak RSS of each job's process, and its tokens/s.

The demo corpus goes through our data stages once; its train split's token arrays are then
repeated to --tokens (1x) and 10x and 100x that (3 M, 30 M and 300 M tokens by default: about
the tokens of 10 MB, 100 MB and 1 GB of English text), beside the same validation split. Each
job is a fresh process running `snaketune.train.trainer.train_model`, as the rule runs it; the
peak RSS
is the kernel's (wait4), counting the pages of the memory-mapped arrays the job touched.
Training draws its batches from the whole corpus, so a job that loaded it would show it here.

Run: .venv/bin/python bench/bench_train_memory.py [--tokens 3000000] [--steps 150]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SCALES = (1, 10, 100)
BLOCK = 128


def model_and_train(steps: int):
    from snaketune.train.settings import ModelSettings, TrainJob, TrainSettings

    return TrainJob(
        task="causal_lm",
        model=ModelSettings(n_layer=2, n_embd=128, n_head=4, dropout=0.1),
        train=TrainSettings(
            max_steps=steps, batch_size=16, eval_every=steps, eval_rows=256, threads=2
        ),
    )


def repeat_train_split(shards: Path, out: Path, tokens: int) -> int:
    """A copy of `shards` whose train arrays hold the train split repeated to >= `tokens`."""
    from snaketune.names import TRAIN
    from snaketune.tokenize.shards import OFFSETS, TOKENS, split_dir

    shutil.copytree(shards, out)
    source, target = split_dir(shards, TRAIN), split_dir(out, TRAIN)
    offsets = np.fromfile(source / OFFSETS, dtype=np.int64)
    ids = (source / TOKENS).read_bytes()
    per_copy = int(offsets[-1])
    copies = -(-tokens // per_copy)
    with open(target / TOKENS, "wb") as t, open(target / OFFSETS, "wb") as o:
        o.write(offsets[:1].tobytes())
        for k in range(copies):
            t.write(ids)
            o.write((offsets[1:] + k * per_copy).tobytes())
    return copies * per_copy


def child(shards: str, manifest: str, tokenizer: str, out: str, steps: int) -> None:
    """One training job in this process; prints its median tokens/s after the first steps."""
    from snaketune.local import PreparedData
    from snaketune.train.trainer import train_model

    data = PreparedData({}, Path(tokenizer), Path(shards), Path(manifest))
    history = train_model(data.train_paths(Path(out)), model_and_train(steps))
    print(json.dumps({"tokens_per_s": float(np.median([r["tokens_per_s"] for r in history[10:]]))}))


def resident(pid: int) -> dict[str, int]:
    """RssAnon (the process's own memory) and RssFile (pages of mapped files, which the kernel
    may drop and processes share) in KiB, from /proc."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    fields = (line.split() for line in lines if line.startswith(("RssAnon", "RssFile")))
    return {f[0].rstrip(":"): int(f[1]) for f in fields}


def run_job(data, shards: Path, out: Path, steps: int) -> dict[str, float]:
    """Peak RSS (the kernel's, from wait4), peak anonymous and file-backed RSS (sampled every
    20 ms), all in MiB, and tokens/s of one training job's process."""
    command = [
        sys.executable,
        __file__,
        "--child",
        str(shards),
        str(data.tokenize_manifest),
        str(data.tokenizer),
        str(out),
        str(steps),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryFile() as stdout:
        process = subprocess.Popen(command, stdout=stdout, stderr=subprocess.DEVNULL, env=env)
        peaks = {"RssAnon": 0, "RssFile": 0}
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            for key, kib in resident(process.pid).items():
                peaks[key] = max(peaks[key], kib)
            time.sleep(0.02)
        stdout.seek(0)
        output = stdout.read().decode()
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"the training job on {shards} failed (exit {process.returncode})")
    return {
        "rss": usage.ru_maxrss / 1024,
        "anon": peaks["RssAnon"] / 1024,
        "file": peaks["RssFile"] / 1024,
        "tokens_per_s": json.loads(output.strip().splitlines()[-1])["tokens_per_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=3_000_000, help="training tokens at 1x")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each; the best counts")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        *paths, steps = args.child
        child(*paths, int(steps))
        return
    from snaketune import local
    from snaketune.names import TRAIN
    from snaketune.tokenize.shards import TOKENS, split_dir

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = local.demo_config("causal_lm", block_size=BLOCK, vocab_size=2000)
        data = local.prepare_data(config, local.DEMO_EXPERIMENT, root / "data")
        results: dict[int, list[dict]] = {scale: [] for scale in SCALES}
        tokens, sizes = {}, {}
        for scale in SCALES:
            shards = root / f"shards-{scale}x"
            tokens[scale] = repeat_train_split(data.shards, shards, args.tokens * scale)
            sizes[scale] = (split_dir(shards, TRAIN) / TOKENS).stat().st_size / 2**20
        for repeat in range(args.repeats):  # interleaved, so a slow spell hits every scale
            for scale in SCALES:
                out = root / f"train-{scale}x-{repeat}"
                results[scale].append(run_job(data, root / f"shards-{scale}x", out, args.steps))

    print(
        f"tiny GPT-2 (2 x 128), {args.steps} steps of 16 x {BLOCK} tokens, CPU, one process per "
        f"job, best of {args.repeats}"
    )
    print(
        f"{'corpus':>7}{'train tokens':>14}{'tokens.bin':>12}{'peak RSS':>10}{'vs 1x':>7}"
        f"{'anon':>9}{'file':>9}{'tokens/s':>10}{'vs 1x':>7}"
    )
    best = {
        scale: {
            "rss": min(r["rss"] for r in runs),
            "anon": min(r["anon"] for r in runs),
            "file": min(r["file"] for r in runs),
            "tokens_per_s": max(r["tokens_per_s"] for r in runs),
        }
        for scale, runs in results.items()
    }
    first = best[SCALES[0]]
    for scale, b in best.items():
        print(
            f"{scale:>6}x{tokens[scale]:>14,}{sizes[scale]:>9.0f} MB{b['rss']:>6.0f} MiB"
            f"{b['rss'] / first['rss']:>6.2f}x{b['anon']:>5.0f} MiB{b['file']:>5.0f} MiB"
            f"{b['tokens_per_s']:>10.0f}{b['tokens_per_s'] / first['tokens_per_s']:>6.2f}x"
        )
    print(
        "peak RSS: the kernel's maximum resident set; anon: the job's own memory; file: pages "
        "of the memory-mapped arrays (and libraries) it touched, which the kernel may drop and "
        "processes on one machine share (anon and file are sampled every 20 ms)"
    )


if __name__ == "__main__":
    main()

"""How fast is our tokenize stage? One process, one corpus, one tokenizer, side by side:

1. ours: `snaketune.tokenize.one_process.tokenize_in_one_process`, the workflow's tokenize jobs
   (plan with its encoder check, each partition, gather: Parquet in, EOS-joined packed blocks,
   Parquet shards out, manifests with digests), with the encoder the plan picks (gigatoken when
   it gives tokenizers' ids) and again with `tokenize.encoder: hf`;
2. reference: `datasets.Dataset.map(tokenize, batched=True)` then block grouping as in
   Hugging Face's run_clm.py, written to Parquet;
3. limits: the bare encoders over the same texts, nothing else: gigatoken's `encode_batch` and
   tokenizers' `encode_batch_fast`.

Prints wall seconds, CPU seconds (every thread of the process), tokens/s and each method's time
relative to ours; on a shared machine the CPU seconds are the steadier figure. Then the peak RSS
of our stage in a fresh process at 1x and 10x the corpus (distinct text both times: an encoder's
word caches would grow with new words), and with --profile where our stage's time goes. Every
module is imported before the timing starts (a job's imports are bench_data_stages.py's).

Corpus: bench/corpus.py, --mb megabytes of distinct text (a bigram chain over the corpora in
../shared/data, with a long tail of identifiers). The Rust encoders spread each batch over every
core: set RAYON_NUM_THREADS=1 (or 2, 4...) to measure at a given width.

Run: .venv/bin/python bench/bench_tokenize.py [--mb 25] [--block-size 256] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus import documents  # noqa: E402
from references import run_clm_tokenize  # noqa: E402

from snaketune.fileio import PARQUET_ROW_GROUP_ROWS  # noqa: E402
from snaketune.names import SPLITS  # noqa: E402


def write_split(path: Path, docs: list[str]) -> None:
    ids = [f"{i:016x}" for i in range(len(docs))]
    pd.DataFrame({"doc_id": ids, "text": docs, "label": [None] * len(docs)}).astype(
        "string"
    ).to_parquet(path, index=False, row_group_size=PARQUET_ROW_GROUP_ROWS)  # as split writes


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(run, *args) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds, train tokens) of one method."""
    cpu, started = cpu_seconds(), time.perf_counter()
    tokens = run(*args)
    return time.perf_counter() - started, cpu_seconds() - cpu, tokens


def run_ours(work: Path, tokenizer_dir: Path, block: int, encoder: str = "auto") -> int:
    import json

    from snaketune.tokenize.one_process import tokenize_in_one_process
    from snaketune.tokenize.settings import TokenizeJob, TokenizeSettings

    splits = {name: work / f"{name}.parquet" for name in SPLITS}
    settings = TokenizeSettings(block_size=block, shard_rows=8192, encoder=encoder)
    out = work / f"ours-{encoder}"
    stats = tokenize_in_one_process(
        splits, tokenizer_dir, out, out.with_suffix(".json"), TokenizeJob("causal_lm", settings)
    )
    ENCODERS_RAN[encoder] = json.loads(out.with_suffix(".json").read_text())["encoder"]
    return stats["train"].tokens


ENCODERS_RAN: dict[str, dict] = {}


def run_reference(work: Path, tokenizer, block: int) -> int:
    return run_clm_tokenize(work, tokenizer, block, work)


def run_hf_limit(docs: list[str], tokenizer) -> list:
    return tokenizer.backend_tokenizer.encode_batch_fast(docs, add_special_tokens=False)


# In a fresh process: gigatoken's pretoken cache is process-wide, and the runs above filled it
# with these very texts. Only the encode call is timed.
COLD_FAST_ENCODER = """
import sys, time, resource
import gigatoken, pyarrow.parquet as pq
texts = pq.read_table(sys.argv[1], columns=["text"]).column("text").to_pylist()
tokenizer = gigatoken.Tokenizer(sys.argv[2])
usage = resource.getrusage(resource.RUSAGE_SELF)
cpu, started = usage.ru_utime + usage.ru_stime, time.perf_counter()
encoded = tokenizer.encode_batch(texts)
seconds = time.perf_counter() - started
usage = resource.getrusage(resource.RUSAGE_SELF)
print(seconds, usage.ru_utime + usage.ru_stime - cpu, len(encoded.layout.content) + len(texts))
"""


def run_fast_limit(work: Path) -> tuple[float, float, int]:
    """(seconds, CPU seconds, tokens with one EOS per document) of bare gigatoken, cold."""
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            COLD_FAST_ENCODER,
            str(work / "train.parquet"),
            str(work / "tok" / "tokenizer.json"),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    seconds, cpu, tokens = out.stdout.split()
    return float(seconds), float(cpu), int(tokens)


# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent (this benchmark,
# holding the corpus), which would report the parent's size instead of the stage's.
PEAK_RSS_SCRIPT = """
import re, sys
from pathlib import Path
from snaketune.names import SPLITS
from snaketune.tokenize.settings import TokenizeJob, TokenizeSettings
from snaketune.tokenize.one_process import tokenize_in_one_process
work, out = Path(sys.argv[1]), Path(sys.argv[2])
splits = {name: work / f"{name}.parquet" for name in SPLITS}
job = TokenizeJob("causal_lm", TokenizeSettings(block_size=int(sys.argv[3])))
tokenize_in_one_process(splits, work / "tok", out, out.with_suffix(".json"), job)
print(re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text())[1])
"""


def peak_rss_mb(work: Path, block: int, tag: str) -> float:
    """Peak RSS of our stage alone, in a fresh process (the way a Snakemake job runs it)."""
    out = subprocess.run(
        [sys.executable, "-c", PEAK_RSS_SCRIPT, str(work), str(work / tag), str(block)],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def profile_ours(work: Path, block: int, top: int = 14) -> None:
    """Where our stage's time goes: cProfile of one more run, the costliest calls."""
    profiler = cProfile.Profile()
    profiler.enable()
    run_ours(work, work / "tok", block, "auto")
    profiler.disable()
    stats = pstats.Stats(profiler)
    total = stats.total_tt
    rows = sorted(stats.stats.items(), key=lambda item: item[1][3], reverse=True)
    print(f"where our stage's time goes (cumulative seconds of {total:.2f} s on this thread):")
    for (file, line, name), (_, _, _, cumulative, _) in rows[:top]:
        where = f"{Path(file).name}:{line}" if line else file
        print(f"  {cumulative:7.2f} s  {name}  ({where})")


def prepared_work(work: Path, docs: list[str], vocab: int) -> None:
    from snaketune.data.paths import TokenizerPaths
    from snaketune.data.settings import TokenizerSettings
    from snaketune.data.tokenizer import prepare_tokenizer

    write_split(work / "train.parquet", docs)
    write_split(work / "val.parquet", docs[:200])
    write_split(work / "test.parquet", docs[200:400])
    tokenizer = TokenizerPaths(work / "train.parquet", work / "tok", work / "tok.json")
    prepare_tokenizer(tokenizer, TokenizerSettings(vocab_size=vocab))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=25.0)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()

    # Imported before any timing, as the bare encoders' are: a job's imports are start-up,
    # which bench_data_stages.py measures with the rest of a job's fixed costs.
    import awkward  # noqa: F401
    import gigatoken  # noqa: F401
    from transformers import AutoTokenizer

    docs, name = documents(args.mb)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepared_work(work, docs, args.vocab_size)
        # A fresh tokenizer for each method: the BPE word cache would favour whoever runs later.
        ours = timed(run_ours, work, work / "tok", args.block_size, "auto")
        ours_hf = timed(run_ours, work, work / "tok", args.block_size, "hf")
        reference = timed(
            run_reference, work, AutoTokenizer.from_pretrained(work / "tok"), args.block_size
        )
        fast_limit = run_fast_limit(work)
        seconds, cpu, encodings = timed(
            run_hf_limit, docs, AutoTokenizer.from_pretrained(work / "tok")
        )
        hf_limit = (seconds, cpu, sum(len(e.ids) + 1 for e in encodings))
        if args.profile:
            profile_ours(work, args.block_size)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepared_work(work, docs, args.vocab_size)
        rss_1x = peak_rss_mb(work, args.block_size, "x1")
        more, _ = documents(args.mb * 10, seed=1)  # ten times the text, all of it new
        write_split(work / "train.parquet", more)
        del more
        rss_10x = peak_rss_mb(work, args.block_size, "x10")

    print(
        f"corpus: {name}, {sum(map(len, docs)) / 1e6:.1f} M chars; block_size "
        f"{args.block_size}, vocab {args.vocab_size}; encoder threads "
        f"{os.environ.get('RAYON_NUM_THREADS', os.cpu_count())}"
    )
    print(f"the plan chose: {ENCODERS_RAN['auto']['name']} ({ENCODERS_RAN['auto']['reason']})")
    print(f"{'method':<52}{'seconds':>9}{'cpu s':>8}{'M tokens/s':>12}{'time vs ours':>14}")
    rows = [
        ("ours: the tokenize rules' code, in one process", ours),
        ("ours with tokenize.encoder: hf", ours_hf),
        ("reference: datasets.map + run_clm grouping", reference),
        ("limit: gigatoken encode_batch only (fresh process)", fast_limit),
        ("limit: tokenizers encode_batch_fast only", hf_limit),
    ]
    for label, (seconds, cpu, tokens) in rows:
        print(
            f"{label:<52}{seconds:>9.2f}{cpu:>8.2f}{tokens / seconds / 1e6:>12.2f}"
            f"{seconds / ours[0]:>13.2f}x"
        )
    print(
        f"ours/reference speed: {reference[0] / ours[0]:.2f}x (CPU {reference[1] / ours[1]:.2f}x); "
        f"ours/bare gigatoken: {fast_limit[0] / ours[0]:.2f}x; ours/ours-with-hf: "
        f"{ours_hf[0] / ours[0]:.2f}x"
    )
    print(
        f"peak RSS of our stage (own process): {rss_1x:.0f} MB at 1x, {rss_10x:.0f} MB at 10x "
        f"the corpus ({rss_10x / rss_1x:.2f}x)"
    )


if __name__ == "__main__":
    main()

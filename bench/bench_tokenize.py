"""How fast is our tokenize stage? One process, one corpus, one tokenizer, three methods:

1. ours: `snaketune.tokenize.one_process.tokenize_in_one_process`, the workflow's tokenize jobs
   (plan, partitions, gather) one after another
   (plan, each partition, gather: Parquet in, EOS-joined packed blocks, Parquet shards out,
   manifests with digests);
2. reference: `datasets.Dataset.map(tokenize, batched=True)` then block grouping as in
   Hugging Face's run_clm.py, written to Parquet;
3. limit: the Rust tokenizer's `encode_batch` over the same texts, nothing else.

Prints wall seconds, CPU seconds (every thread of the process), tokens/s and each method's time
relative to ours; on a shared machine the CPU seconds are the steadier figure. The Rust encoder
spreads each batch over every core while datasets.map's Python work runs on one, so the ratio to
the reference grows with the core count: set RAYON_NUM_THREADS=1 (or 2, 4...) to measure it at a
given width. Corpus: Tiny Shakespeare from ../shared/data when present (repeated --repeat
times), else the embedded demo corpus.

Run: .venv/bin/python bench/bench_tokenize.py [--repeat 8] [--block-size 256]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from itertools import chain
from pathlib import Path

import pandas as pd

from snaketune.fileio import PARQUET_ROW_GROUP_ROWS
from snaketune.names import SPLITS

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
DEMO = REPO / "workflow" / "resources" / "demo" / "support.jsonl.gz"


def load_documents(repeat: int) -> tuple[list[str], str]:
    if SHAKESPEARE.exists():
        # Paragraphs (speeches) are the documents.
        paragraphs = [p for p in SHAKESPEARE.read_text().split("\n\n") if p.strip()]
        return paragraphs * repeat, f"tinyshakespeare x{repeat}"
    with gzip.open(DEMO, "rt") as fh:
        rows = [json.loads(line) for line in fh]
    docs = [f"Customer: {r['question']}\nAgent: {r['answer']}" for r in rows]
    return docs * repeat * 10, f"demo corpus x{repeat * 10}"


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


def run_ours(work: Path, tokenizer_dir: Path, block: int) -> int:
    from snaketune.settings import TokenizeJob, TokenizeSettings
    from snaketune.tokenize.one_process import tokenize_in_one_process

    splits = {name: work / f"{name}.parquet" for name in SPLITS}
    stats = tokenize_in_one_process(
        splits,
        tokenizer_dir,
        work / "ours",
        work / "ours.json",
        TokenizeJob("causal_lm", TokenizeSettings(block_size=block, shard_rows=8192)),
    )
    return stats["train"].tokens


def run_reference(work: Path, tokenizer, block: int) -> int:
    import datasets

    datasets.disable_progress_bars()
    eos = tokenizer.eos_token

    def tokenize(batch):
        return tokenizer([t + eos for t in batch["text"]])

    def group_texts(examples):  # run_clm.py's grouping
        concatenated = {k: list(chain(*examples[k])) for k in examples}
        total = (len(concatenated["input_ids"]) // block) * block
        result = {
            k: [t[i : i + block] for i in range(0, total, block)] for k, t in concatenated.items()
        }
        result["labels"] = result["input_ids"].copy()
        return result

    tokens = 0
    cache = str(work / "hf-cache")  # run_clm.py's default: map results cached as Arrow files
    for name in SPLITS:
        ds = datasets.Dataset.from_parquet(str(work / f"{name}.parquet"), cache_dir=cache)
        ds = ds.map(tokenize, batched=True, remove_columns=ds.column_names)
        ds = ds.map(group_texts, batched=True, batch_size=1000)
        ds.select_columns(["input_ids"]).to_parquet(str(work / f"reference-{name}.parquet"))
        tokens += len(ds) * block if name == "train" else 0
    return tokens


def run_limit(docs: list[str], tokenizer) -> list:
    return tokenizer.backend_tokenizer.encode_batch(docs, add_special_tokens=False)


# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent (this benchmark,
# holding the corpus), which would report the parent's size instead of the stage's.
PEAK_RSS_SCRIPT = """
import re, sys
from pathlib import Path
from snaketune.names import SPLITS
from snaketune.settings import TokenizeJob, TokenizeSettings
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--vocab-size", type=int, default=8000)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from snaketune.settings import TokenizerSettings
    from snaketune.stages import TokenizerPaths
    from snaketune.tokenizer import prepare_tokenizer

    docs, name = load_documents(args.repeat)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_split(work / "train.parquet", docs)
        write_split(work / "val.parquet", docs[:200])
        write_split(work / "test.parquet", docs[:200])
        tokenizer = TokenizerPaths(work / "train.parquet", work / "tok", work / "tok.json")
        prepare_tokenizer(tokenizer, TokenizerSettings(vocab_size=args.vocab_size))
        # A fresh tokenizer for each method: the BPE word cache would favour whoever runs later.
        ours = timed(run_ours, work, work / "tok", args.block_size)
        reference = timed(
            run_reference, work, AutoTokenizer.from_pretrained(work / "tok"), args.block_size
        )
        seconds, cpu, encodings = timed(
            run_limit, docs, AutoTokenizer.from_pretrained(work / "tok")
        )
        limit = (seconds, cpu, sum(len(e.ids) for e in encodings))  # counted outside the timing

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name_, part in (("val", docs[:200]), ("test", docs[:200])):
            write_split(work / f"{name_}.parquet", part)
        write_split(work / "train.parquet", docs)
        tokenizer = TokenizerPaths(work / "train.parquet", work / "tok", work / "tok.json")
        prepare_tokenizer(tokenizer, TokenizerSettings(vocab_size=args.vocab_size))
        rss_1x = peak_rss_mb(work, args.block_size, "x1")
        write_split(work / "train.parquet", docs * 10)
        rss_10x = peak_rss_mb(work, args.block_size, "x10")

    print(
        f"corpus: {name}, {len(docs):,} documents, {sum(map(len, docs)) / 1e6:.1f} M chars; "
        f"block_size {args.block_size}, vocab {args.vocab_size}; encoder threads "
        f"{os.environ.get('RAYON_NUM_THREADS', os.cpu_count())}"
    )
    print(f"{'method':<44}{'seconds':>9}{'cpu s':>8}{'M tokens/s':>12}{'time vs ours':>14}")
    rows = [
        ("ours: the tokenize rules' code, in one process", ours),
        ("reference: datasets.map + run_clm grouping", reference),
        ("limit: encode_batch only", limit),
    ]
    for label, (seconds, cpu, tokens) in rows:
        print(
            f"{label:<44}{seconds:>9.2f}{cpu:>8.2f}{tokens / seconds / 1e6:>12.2f}"
            f"{seconds / ours[0]:>13.2f}x"
        )
    print(
        f"ours/reference speed: {reference[0] / ours[0]:.2f}x (CPU {reference[1] / ours[1]:.2f}x); "
        f"ours/limit speed: {limit[0] / ours[0]:.2f}x (CPU {limit[1] / ours[1]:.2f}x)"
    )
    print(
        f"peak RSS of our stage (own process): {rss_1x:.0f} MB at 1x, {rss_10x:.0f} MB at 10x "
        f"({rss_10x / rss_1x:.2f}x)"
    )


if __name__ == "__main__":
    main()

"""How fast is our tokenize stage? One process, one corpus, one tokenizer, three methods:

1. ours: `snaketune.shards.tokenize_shards` (the code the rule runs: Parquet in, EOS-joined
   packed blocks, Parquet shards out, manifest with digests);
2. reference: `datasets.Dataset.map(tokenize, batched=True)` then block grouping as in
   Hugging Face's run_clm.py, written to Parquet;
3. limit: the Rust tokenizer's `encode_batch` over the same texts, nothing else.

Prints seconds, tokens/s and each method's time relative to ours. Corpus: Tiny Shakespeare from
../shared/data when present (repeated --repeat times), else the embedded demo corpus.

Run: .venv/bin/python bench/bench_tokenize.py [--repeat 8] [--block-size 256]
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import tempfile
import time
from itertools import chain
from pathlib import Path

import pandas as pd

from snaketune.fileio import PARQUET_ROW_GROUP_ROWS

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


def run_ours(work: Path, tokenizer_dir: Path, block: int) -> tuple[float, int]:
    from snaketune.shards import TokenizeSettings, tokenize_shards

    splits = {name: work / f"{name}.parquet" for name in ("train", "val", "test")}
    started = time.perf_counter()
    stats = tokenize_shards(
        splits,
        tokenizer_dir,
        work / "ours",
        work / "ours.json",
        TokenizeSettings(task="causal_lm", block_size=block, shard_rows=8192),
    )
    return time.perf_counter() - started, stats["train"].tokens


def run_reference(work: Path, tokenizer, block: int) -> tuple[float, int]:
    import datasets

    datasets.disable_progress_bars()
    eos = tokenizer.eos_token

    def tokenize(batch):
        return tokenizer([t + eos for t in batch["text"]])

    def group_texts(examples):  # run_clm.py's grouping
        concatenated = {k: list(chain(*examples[k])) for k in examples}
        total = (len(concatenated["input_ids"]) // block) * block
        return {
            k: [t[i : i + block] for i in range(0, total, block)] for k, t in concatenated.items()
        }

    started = time.perf_counter()
    tokens = 0
    cache = str(work / "hf-cache")  # run_clm.py's default: map results cached as Arrow files
    for name in ("train", "val", "test"):
        ds = datasets.Dataset.from_parquet(str(work / f"{name}.parquet"), cache_dir=cache)
        ds = ds.map(tokenize, batched=True, remove_columns=ds.column_names)
        ds = ds.map(group_texts, batched=True, batch_size=1000)
        ds.select_columns(["input_ids"]).to_parquet(str(work / f"reference-{name}.parquet"))
        tokens += len(ds) * block if name == "train" else 0
    return time.perf_counter() - started, tokens


def run_limit(docs: list[str], tokenizer) -> tuple[float, int]:
    started = time.perf_counter()
    encodings = tokenizer.backend_tokenizer.encode_batch(docs, add_special_tokens=False)
    return time.perf_counter() - started, sum(len(e.ids) for e in encodings)


PEAK_RSS_SCRIPT = """
import resource, sys
from pathlib import Path
from snaketune.shards import TokenizeSettings, tokenize_shards
work, out = Path(sys.argv[1]), Path(sys.argv[2])
splits = {name: work / f"{name}.parquet" for name in ("train", "val", "test")}
tokenize_shards(splits, work / "tok", out, out.with_suffix(".json"),
                TokenizeSettings(task="causal_lm", block_size=int(sys.argv[3])))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
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

    from snaketune.tokenizer import TokenizerSettings, prepare_tokenizer

    docs, name = load_documents(args.repeat)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_split(work / "train.parquet", docs)
        write_split(work / "val.parquet", docs[:200])
        write_split(work / "test.parquet", docs[:200])
        prepare_tokenizer(
            work / "train.parquet",
            work / "tok",
            work / "tok.json",
            TokenizerSettings(vocab_size=args.vocab_size),
        )
        # A fresh tokenizer for each method: the BPE word cache would favour whoever runs later.
        ours = run_ours(work, work / "tok", args.block_size)
        reference = run_reference(
            work, AutoTokenizer.from_pretrained(work / "tok"), args.block_size
        )
        limit = run_limit(docs, AutoTokenizer.from_pretrained(work / "tok"))

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name_, part in (("val", docs[:200]), ("test", docs[:200])):
            write_split(work / f"{name_}.parquet", part)
        write_split(work / "train.parquet", docs)
        prepare_tokenizer(
            work / "train.parquet",
            work / "tok",
            work / "tok.json",
            TokenizerSettings(vocab_size=args.vocab_size),
        )
        rss_1x = peak_rss_mb(work, args.block_size, "x1")
        write_split(work / "train.parquet", docs * 10)
        rss_10x = peak_rss_mb(work, args.block_size, "x10")

    print(
        f"corpus: {name}, {len(docs):,} documents, {sum(map(len, docs)) / 1e6:.1f} M chars; "
        f"block_size {args.block_size}, vocab {args.vocab_size}"
    )
    print(f"{'method':<44}{'seconds':>9}{'M tokens/s':>12}{'time vs ours':>14}")
    rows = [
        ("ours: tokenize_shards (rule's code)", ours),
        ("reference: datasets.map + run_clm grouping", reference),
        ("limit: encode_batch only", limit),
    ]
    for label, (seconds, tokens) in rows:
        print(
            f"{label:<44}{seconds:>9.2f}{tokens / seconds / 1e6:>12.2f}{seconds / ours[0]:>13.2f}x"
        )
    print(
        f"ours/reference speed: {reference[0] / ours[0]:.2f}x; ours/limit speed: "
        f"{limit[0] / ours[0]:.2f}x"
    )
    print(
        f"peak RSS of our stage (own process): {rss_1x:.0f} MB at 1x, {rss_10x:.0f} MB at 10x "
        f"({rss_10x / rss_1x:.2f}x)"
    )


if __name__ == "__main__":
    main()

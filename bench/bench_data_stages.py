"""Every data stage on a corpus of distinct text, as a user pays for it and against its limits.

One corpus (bench/corpus.py, --mb megabytes of distinct text as a JSON-lines dataset), the real
workflow (`snakemake --cores 2`) up to the trained tokenizer, then the tokenize stage alone, and
beside each stage, in this run:

- clean: our clean job's own seconds (its manifest) vs a bare read-normalize-write pass
  (pyarrow's JSON reader, NFC normalization and whitespace collapse in Arrow compute, Parquet
  out), the limit of any cleaning;
- near-duplicate removal: our `find_near_duplicates` vs datasketch's own batch API
  (`MinHash.bulk` over every document's shingles, then `MinHashLSH` inserts and queries in an
  insertion session), on the first --dedup-docs cleaned documents, same threshold, shingles and
  permutations;
- BPE training: our tokenizer job's seconds vs `tokenizers`' BpeTrainer called directly
  (`train_from_iterator` over the same train split, same settings);
- tokenize: `snakemake` on the tokenize manifest with the upstream done (start-up, the plan, every
  partition and the gather jobs) vs run_clm.py's `datasets.map` + `group_texts` run as a script
  (its imports included) vs the bare fast encoder over the train split in a fresh process.

Prints seconds, MB/s of text and each ratio. Not a test: figures for the README and the notes.

Run: .venv/bin/python bench/bench_data_stages.py [--mb 100] [--dedup-docs 20000]
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from corpus import documents  # noqa: E402

from snaketune.data.paths import CleanPaths, SplitPaths, TokenizerPaths  # noqa: E402
from snaketune.data.tokenizer import EOS, PAD  # noqa: E402
from snaketune.paths import MANIFEST  # noqa: E402
from snaketune.sharing import keys_of, stage_dir  # noqa: E402
from tests.support.workflow import snakemake_command, tiny_config  # noqa: E402

DATASET = "bench-text"

RUN_CLM = """
import sys, time
from pathlib import Path
started = time.perf_counter()
sys.path.insert(0, sys.argv[5])
from references import run_clm_tokenize
from transformers import AutoTokenizer
splits, tokenizer, block, out = sys.argv[1:5]
run_clm_tokenize(Path(splits), AutoTokenizer.from_pretrained(tokenizer), int(block), Path(out))
print(time.perf_counter() - started)
"""

BARE_ENCODER = """
import sys, time
started = time.perf_counter()
import gigatoken, pyarrow.parquet as pq
texts = pq.read_table(sys.argv[1], columns=["text"]).column("text").to_pylist()
gigatoken.Tokenizer(sys.argv[2]).encode_batch(texts)
print(time.perf_counter() - started)
"""


def write_dataset(path: Path, megabytes: float) -> tuple[str, str]:
    docs, source = documents(megabytes)
    with path.open("w") as fh:
        for doc in docs:
            fh.write(json.dumps({"text": doc}) + "\n")
    return hashlib.sha256(path.read_bytes()).hexdigest(), source


def bench_config(data: Path, sha256: str, vocab: int, block: int) -> dict:
    config = tiny_config()
    lm = copy.deepcopy(config["experiments"][0])
    lm.pop("text_template", None)  # the corpus is one text column
    lm.update(dataset=DATASET, tokenizer={"vocab_size": vocab}, tokenize={"block_size": block})
    config["experiments"] = [lm]
    config["datasets"] = {
        DATASET: {"url": str(data), "sha256": sha256, "format": "jsonl", "text_column": "text"}
    }
    return config


def stage_paths(config: dict) -> dict[str, Path]:
    from snaketune.config import validated
    from snaketune.settings import ConfigView

    checked = validated(copy.deepcopy(config), REPO)
    keys = keys_of(ConfigView(checked, REPO), checked["experiments"][0]["name"])
    return {stage: stage_dir(config["results_dir"], stage, key) for stage, key in keys.items()}


def snakemake(workdir: Path, target: Path) -> float:
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    started = time.perf_counter()
    done = subprocess.run(
        snakemake_command(workdir, "--cores", "2", str(target)),
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": path, "HF_HUB_OFFLINE": "1", "MLFLOW_TRACKING_URI": ""},
    )
    if done.returncode:
        sys.exit(done.stdout[-3000:] + done.stderr[-3000:])
    return time.perf_counter() - started


def manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST).read_text())


def python_script(code: str, *args: str) -> float:
    """Wall seconds of a fresh interpreter running `code`, as a user's script pays it."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    if done.returncode:
        sys.exit(done.stderr[-3000:])
    return time.perf_counter() - started


def bare_clean(data: Path, out: Path) -> float:
    """Read, normalize (NFC, whitespace runs to one space) and write: the floor of cleaning."""
    import pyarrow.compute as pc
    import pyarrow.json as pj
    import pyarrow.parquet as pq

    started = time.perf_counter()
    table = pj.read_json(data)
    text = pc.utf8_normalize(table.column("text"), "NFC")
    text = pc.utf8_trim_whitespace(pc.replace_substring_regex(text, r"[ \t]+", " "))
    pq.write_table(table.set_column(0, "text", text), out)
    return time.perf_counter() - started


def dedup_pair(texts: list[str], docs: int) -> tuple[float, float, int, int]:
    """(ours s, datasketch batch API s, ours removed, theirs removed) on the first `docs`."""
    from datasketch import MinHash, MinHashLSH

    from snaketune.data.clean import normalize_for_match
    from snaketune.data.dedup import LSH_WEIGHTS, find_near_duplicates
    from snaketune.data.settings import NearDuplicateSettings
    from snaketune.names import TRAIN

    texts = texts[:docs]
    settings = NearDuplicateSettings()
    started = time.perf_counter()
    dropped, _ = find_near_duplicates(texts, [TRAIN] * len(texts), [TRAIN], settings)
    ours = time.perf_counter() - started

    started = time.perf_counter()
    size = settings.shingle_size
    shingles = []
    for text in texts:
        norm = normalize_for_match(text)
        grams = {norm[i : i + size] for i in range(max(len(norm) - size + 1, 1))}
        shingles.append([g.encode() for g in grams])
    sketches = MinHash.bulk(shingles, num_perm=settings.num_perm, seed=settings.seed)
    index = MinHashLSH(settings.threshold, settings.num_perm, weights=LSH_WEIGHTS)
    removed = 0
    with index.insertion_session() as session:
        for i, sketch in enumerate(sketches):
            if index.query(sketch):
                removed += 1
                continue
            session.insert(i, sketch)
    theirs = time.perf_counter() - started
    return ours, theirs, len(dropped), removed


def direct_bpe(train: Path, vocab: int) -> float:
    """tokenizers' BpeTrainer over the train split, as its documentation calls it."""
    import pyarrow.parquet as pq
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    started = time.perf_counter()
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        min_frequency=2,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    batches = pq.ParquetFile(train).iter_batches(batch_size=1024, columns=["text"])
    backend.train_from_iterator((b.column("text").to_pylist() for b in batches), trainer)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=100.0)
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--dedup-docs", type=int, default=20000)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = work / "corpus.jsonl"
        sha256, source = write_dataset(data, args.mb)
        megabytes = data.stat().st_size / 1e6
        config = bench_config(data, sha256, args.vocab_size, args.block_size)
        config["results_dir"] = str(work / "results")
        (work / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        folders = stage_paths(config)

        upstream_s = snakemake(work, folders["tokenizer"] / MANIFEST)
        clean_s = manifest(folders["clean"])["seconds"]
        split_s = manifest(folders["split"])["seconds"]
        bpe_s = manifest(folders["tokenizer"])["seconds"]
        tokenize_s = snakemake(work, folders["tokenize"] / MANIFEST)
        tokenized = manifest(folders["tokenize"])

        splits = folders["split"]
        train = SplitPaths.output_in(splits, "train")
        tokenizer_dir = TokenizerPaths.output_in(folders["tokenizer"], "tokenizer")
        (work / "run_clm").mkdir()
        run_clm_s = python_script(
            RUN_CLM,
            str(splits),
            str(tokenizer_dir),
            str(args.block_size),
            str(work / "run_clm"),
            str(REPO / "bench"),
        )
        bare_encode_s = python_script(
            BARE_ENCODER, str(train), str(tokenizer_dir / "tokenizer.json")
        )
        bare_clean_s = bare_clean(data, work / "bare.parquet")
        direct_bpe_s = direct_bpe(train, args.vocab_size)
        import pandas as pd

        cleaned = pd.read_parquet(CleanPaths.output_in(folders["clean"], "corpus"))["text"].tolist()
        ours_dedup, theirs_dedup, ours_removed, theirs_removed = dedup_pair(
            cleaned, args.dedup_docs
        )
        docs = min(args.dedup_docs, len(cleaned))

    print(
        f"corpus: {source}, {megabytes:.1f} MB of JSON lines; BPE {args.vocab_size}, "
        f"block {args.block_size}"
    )
    print(
        f"upstream through snakemake (download, clean, split, tokenizer jobs): {upstream_s:.1f} s"
    )
    print(
        f"the tokenize plan chose: {tokenized['encoder']['name']} "
        f"({tokenized['encoder']['reason']})"
    )
    print(
        f"{'stage':<16}{'ours s':>9}{'reference s':>13}{'limit s':>9}{'ours MB/s':>11}"
        f"{'vs reference':>14}{'vs limit':>10}"
    )
    rows = [
        ("clean", clean_s, None, bare_clean_s),
        ("split + dedup", split_s, None, None),
        ("BPE training", bpe_s, direct_bpe_s, None),
        ("tokenize", tokenize_s, run_clm_s, bare_encode_s),
    ]
    for name, ours, reference, limit in rows:
        ref = f"{reference:>13.2f}" if reference else f"{'-':>13}"
        lim = f"{limit:>9.2f}" if limit else f"{'-':>9}"
        vs_ref = f"{reference / ours:>13.2f}x" if reference else f"{'-':>14}"
        vs_lim = f"{limit / ours:>9.2f}x" if limit else f"{'-':>10}"
        print(f"{name:<16}{ours:>9.2f}{ref}{lim}{megabytes / ours:>11.1f}{vs_ref}{vs_lim}")
    print(
        f"near-duplicates on {docs:,} cleaned documents: ours {ours_dedup:.2f} s "
        f"({docs / ours_dedup:,.0f} docs/s, {ours_removed} removed) vs datasketch's batch API "
        f"{theirs_dedup:.2f} s ({docs / theirs_dedup:,.0f} docs/s, {theirs_removed} removed): "
        f"{theirs_dedup / ours_dedup:.2f}x"
    )
    print(
        "tokenize is snakemake on its manifest (start-up and every job); run_clm is a fresh "
        "script (imports included); the limit is gigatoken alone over the train split in a "
        "fresh process; clean and BPE training are the jobs' own seconds (their manifests)"
    )


if __name__ == "__main__":
    main()

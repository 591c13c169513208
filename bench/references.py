"""The methods a user would otherwise reach for, shared by the benchmarks."""

from __future__ import annotations

from itertools import chain
from pathlib import Path

SPLIT_NAMES = ("train", "val", "test")


def run_clm_tokenize(splits: Path, tokenizer, block: int, out: Path) -> int:
    """Hugging Face run_clm.py's data preparation over splits/<name>.parquet: `datasets.map`
    of the tokenizer (EOS appended to each text), then `group_texts` into blocks, written to
    out/<name>.parquet. Returns the train split's tokens."""
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
    cache = str(out / "hf-cache")  # run_clm.py's default: map results cached as Arrow files
    for name in SPLIT_NAMES:
        ds = datasets.Dataset.from_parquet(str(Path(splits) / f"{name}.parquet"), cache_dir=cache)
        ds = ds.map(tokenize, batched=True, remove_columns=ds.column_names)
        ds = ds.map(group_texts, batched=True, batch_size=1000)
        ds.select_columns(["input_ids"]).to_parquet(str(out / f"reference-{name}.parquet"))
        tokens += len(ds) * block if name == "train" else 0
    return tokens

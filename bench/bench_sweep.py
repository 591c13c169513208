"""What does a 3-point sweep cost, now that the points share their data stages? The same three
points (the demo LM, made tiny, at train.lr 0.001 / 0.003 / 0.005) run through the real
workflow (`snakemake --cores 2`) in fresh working directories, one after the other:

1. sweep: one entry with `sweep: {grid: {train.lr: [...]}}`; the points share one clean,
   split, tokenizer and tokenize (snaketune.sharing), then train, evaluate and track each;
2. own data: the same three points written as three experiments whose clean settings differ
   by a no-op (clean.max_chars 4000 / 4001 / 4002: no ticket is that long), so that each
   computes its own data chain,
   as every experiment did before stages were shared (what a user of a per-experiment layout,
   or of hand-written run scripts, pays);
3. bare: the sweep again with its data stages already done (timed from there): the work no
   sharing can remove, the bound.

Prints each one's jobs run (the tokenize partitions, known once their plan has run, and
`all` included) and wall time, and the ratios to the sweep. The demo corpus is
small (3,000 tickets), so here the data stages are a few seconds each; on a real corpus they
are the hours the sharing saves, and the job counts are what carries over.

Run: .venv/bin/python bench/bench_sweep.py
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from snaketune.paths import MANIFEST  # noqa: E402
from snaketune.sharing import keys_of, stage_dir  # noqa: E402
from tests.support.workflow import snakemake_command, tiny_config  # noqa: E402

RATES = [0.001, 0.003, 0.005]


def lm() -> dict:
    config = tiny_config()
    entry = copy.deepcopy(config["experiments"][0])
    config["experiments"] = [entry]
    return config


def sweep_config() -> dict:
    config = lm()
    config["experiments"][0]["sweep"] = {"grid": {"train.lr": RATES}}
    return config


def own_data_config() -> dict:
    config = lm()
    entry = config["experiments"][0]
    config["experiments"] = [
        {
            **copy.deepcopy(entry),
            "name": f"lm-{i}",
            "train": {**entry["train"], "lr": lr},
            "clean": {**entry["clean"], "max_chars": entry["clean"]["max_chars"] + i},
        }
        for i, lr in enumerate(RATES)
    ]
    return config


def run(workdir: Path, config: dict, *targets: str) -> tuple[float, int]:
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    started = time.perf_counter()
    # The jobs call `snaketune`: this interpreter's bin folder first, as `make` puts .venv/bin.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    done = subprocess.run(
        snakemake_command(workdir, "--cores", "2", *targets),
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": path, "HF_HUB_OFFLINE": "1"},
    )
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(done.stdout[-3000:] + done.stderr[-3000:])
    # Every job run, the tokenize partitions (known only once their plan ran) included.
    ran = re.findall(r"^Finished jobid: \d+ \(Rule: (\w+)\)", done.stdout + done.stderr, re.M)
    return seconds, len(ran)


def data_target(config: dict) -> str:
    from snaketune.config import validated
    from snaketune.settings import ConfigView

    checked = validated(copy.deepcopy(config), REPO)
    first = checked["experiments"][0]["name"]
    key = keys_of(ConfigView(checked, REPO), first)["tokenize"]
    return str(stage_dir(config["results_dir"], "tokenize", key) / MANIFEST)


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, config in (("sweep", sweep_config()), ("own data", own_data_config())):
            workdir = Path(tmp) / name.replace(" ", "-")
            workdir.mkdir()
            rows.append((name, *run(workdir, config)))
        bare = Path(tmp) / "bare"
        bare.mkdir()
        run(bare, sweep_config(), data_target(sweep_config()))
        rows.append(("bare", *run(bare, sweep_config())))
    reference = rows[0][1]
    print(f"{'run':<10} {'jobs':>5} {'wall s':>8} {'vs sweep':>9}")
    for name, seconds, jobs in rows:
        print(f"{name:<10} {jobs:>5} {seconds:>8.1f} {seconds / reference:>8.2f}x")


if __name__ == "__main__":
    main()

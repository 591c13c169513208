"""What does the tokenize plan job pay to load its tokenizer? The trained BPE of the demo
(our tokenizer stage, vocab 400) loaded in a fresh process, as the plan job does, three ways:

1. ours: snaketune.tokenize.encoder.tokenizer_facts (tokenizers alone for a plain
   tokenizer.json);
2. transformers: AutoTokenizer.from_pretrained, what the plan job did before;
3. bare: `import tokenizers` and Tokenizer.from_file, the least a process can do.

Prints each one's wall time and peak RSS (medians of --repeats fresh processes) and the ratios
to transformers'. With a thousand partitions this start-up is paid once per tokenize, not per
partition (the partitions read the plan's encoder.json with tokenizers already).

Run: .venv/bin/python bench/bench_plan_start.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LOADERS = {
    "ours": "from snaketune.tokenize.encoder import tokenizer_facts; tokenizer_facts(FOLDER)",
    "transformers": "from transformers import AutoTokenizer; AutoTokenizer.from_pretrained(FOLDER)",
    "bare": "from tokenizers import Tokenizer; Tokenizer.from_file(FOLDER + '/tokenizer.json')",
}


def one_run(code: str, folder: Path) -> tuple[float, float]:
    """(seconds, peak RSS MiB) of a fresh Python process running `code`."""
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over an exec from the forking parent.
    report = (
        "print([line.split()[1] for line in open('/proc/self/status') "
        "if line.startswith('VmHWM')][0])"
    )
    program = f"FOLDER = {str(folder)!r}\n{code}\n{report}"
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", program],
        check=True,
        capture_output=True,
        text=True,
        env={"HF_HUB_OFFLINE": "1"},
    )
    seconds = time.perf_counter() - started
    return seconds, int(done.stdout.split()[-1]) / 1024  # VmHWM is in kB


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from snaketune import local

    with tempfile.TemporaryDirectory() as tmp:
        config = local.demo_config("causal_lm")
        data = local.prepare_data(config, local.DEMO_EXPERIMENT, Path(tmp))
        times: dict[str, list[float]] = {name: [] for name in LOADERS}
        peaks: dict[str, list[float]] = {name: [] for name in LOADERS}
        for _ in range(args.repeats):  # interleaved, so that a busy moment hits every loader
            for name, code in LOADERS.items():
                seconds, peak = one_run(code, data.tokenizer)
                times[name].append(seconds)
                peaks[name].append(peak)
    reference = statistics.median(times["transformers"])
    print(f"{'loader':<13} {'wall s':>7} {'vs transformers':>16} {'peak RSS MiB':>13}")
    for name in LOADERS:
        wall = statistics.median(times[name])
        peak = statistics.median(peaks[name])
        print(f"{name:<13} {wall:>7.2f} {wall / reference:>15.2f}x {peak:>13.0f}")


if __name__ == "__main__":
    main()

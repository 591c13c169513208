"""What does tracking cost? Training makes no MLflow calls (results/ is the source of truth and
the track stage mirrors it afterwards), so inside training the only tracking code is the
system-metrics sampler thread. In one process:

1. the demo-lm model (config.yaml: GPT-2 2 x 128, batch 16 x 128 tokens, same seed) trained
   alternately with and without the sampler; prints each time, the medians and their ratio, and
   the sampler's own cost (time per sample x samples taken) as a share of training time;
2. the track stage as the rule runs it (`snaketune track` in a new process, into a fresh SQLite
   store, the model logged and registered), timed against the training time.

Data: the demo corpus through our data stages (tests.conftest.prepare_stage_data, BPE vocab 400).
Run: .venv/bin/python bench/bench_tracking.py [--steps 300] [--repeats 2] [--interval 5]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO_PROMPTS = ["Customer: I was charged twice for order #123456.\nAgent:"]
sys.path.insert(0, str(REPO))
from tests.conftest import prepare_stage_data, run_training  # noqa: E402


@dataclass(frozen=True)
class Timing:
    wall: float
    cpu: float
    """CPU seconds of this process, every thread (the sampler's included): unlike wall time,
    barely moved by other processes competing for the cores."""


def train_once(data: dict, out: Path, steps: int, interval: float, sampler: bool) -> Timing:
    import snaketune.train as train
    from snaketune.models import ModelSettings
    from snaketune.system_metrics import sample_system_metrics

    def sampled(path, device=None):
        return sample_system_metrics(path, device, interval_s=interval)

    train.sample_system_metrics = sampled if sampler else (lambda *a, **k: contextlib.nullcontext())
    settings = train.TrainSettings(
        max_steps=steps, batch_size=16, lr=0.003, warmup_steps=30, eval_every=50, seed=1
    )
    model = ModelSettings(n_layer=2, n_embd=128, n_head=4, dropout=0.1)
    wall, cpu = time.perf_counter(), time.process_time()
    run_training(data, out, "causal_lm", model, settings)
    return Timing(time.perf_counter() - wall, time.process_time() - cpu)


def sampler_seconds_per_sample(samples: int = 200) -> float:
    import io

    from snaketune.system_metrics import Sampler, write_sample

    sampler, out = Sampler(), io.StringIO()
    started = time.perf_counter()
    for _ in range(samples):
        write_sample(out, sampler)
    return (time.perf_counter() - started) / samples


def evaluate(root: Path, data: dict, train_dir: Path) -> Path:
    from snaketune.evaluation import EvalSettings, evaluate_model

    out = root / "evaluate"
    evaluate_model(
        train_dir / "model",
        data["shards"],
        data["tokenize_manifest"],
        {"train": data["splits"]["train"], "test": data["splits"]["test"]},
        out / "metrics.json",
        out / "samples.jsonl",
        out / "manifest.json",
        "causal_lm",
        EvalSettings(prompts=DEMO_PROMPTS),
    )
    return out


def track_once(root: Path, train_dir: Path, eval_dir: Path) -> float:
    """`snaketune track` with the arguments the track rule passes, timed as a new process."""
    store = root / "store"
    store.mkdir()
    config = {"name": "demo-lm", "dataset": "support-demo", "task": "causal_lm"}
    config["evaluate"] = {"max_new_tokens": 40}
    settings = {
        "experiment": "demo-lm",
        "mlflow_experiment": "bench-tracking",
        "tracking_uri": f"sqlite:///{store}/mlflow.db",
        "artifact_location": f"file://{store}/artifacts",
        "config": config,
        "registered_model_name": "bench-tracking.demo-lm",
    }
    stages = {
        "download": [root / "download" / "manifest.json"],
        "clean": [root / "clean" / "manifest.json", root / "clean" / "report.json"],
        "split": [root / "split" / "manifest.json"],
        "tokenizer": [root / "tokenizer" / "manifest.json", root / "tokenizer" / "tokenizer"],
        "tokenize": [root / "tokenize" / "manifest.json"],
        "train": [train_dir / name for name in ("manifest.json", "history.jsonl", "model")]
        + [train_dir / "system_metrics.jsonl", train_dir / "loss_curve.png"],
        "evaluate": [eval_dir / name for name in ("manifest.json", "metrics.json")]
        + [eval_dir / "samples.jsonl", eval_dir / "eval_plot.png"],
    }
    command = [str(Path(sys.executable).with_name("snaketune")), "track"]
    command += ["--settings", json.dumps(settings), "--runs", str(root / "runs.json")]
    command += ["--history", str(train_dir / "history.jsonl")]
    command += ["--metrics", str(eval_dir / "metrics.json"), "--model", str(train_dir / "model")]
    command += ["--system-metrics", str(train_dir / "system_metrics.jsonl")]
    for name, paths in stages.items():
        command += ["--stage", name, *map(str, paths)]
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, text=True)
    return time.perf_counter() - started


def artifact_megabytes(store: Path) -> dict[str, float]:
    def size(paths) -> float:
        return sum(p.stat().st_size for p in paths if p.is_file()) / 1e6

    artifacts = store / "artifacts"
    return {
        "logged model (transformers flavour)": size(artifacts.glob("models/*/artifacts/**/*")),
        "train run's raw model dir": size(artifacts.glob("*/artifacts/model/*")),
        "all artifacts": size(artifacts.rglob("*")),
    }


def time_training(data: dict, root: Path, args) -> dict[bool, Timing]:
    """Median wall and CPU seconds with and without the sampler: after an untimed warm-up (the
    first training in a process pays for imports and allocator growth), in alternating order."""
    train_once(data, root / "warm-up", 5, args.interval, sampler=False)
    times: dict[bool, list[Timing]] = {True: [], False: []}
    for i in range(args.repeats):
        for sampler in (True, False) if i % 2 == 0 else (False, True):
            out = root / f"train-{i}-{'on' if sampler else 'off'}"
            timing = train_once(data, out, args.steps, args.interval, sampler)
            times[sampler].append(timing)
            state = "on " if sampler else "off"
            print(
                f"train {args.steps} steps, sampler {state}: {timing.wall:.1f} s wall, "
                f"{timing.cpu:.1f} s CPU",
                flush=True,
            )
    return {
        on: Timing(statistics.median(t.wall for t in runs), statistics.median(t.cpu for t in runs))
        for on, runs in times.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--interval", type=float, default=5.0, help="sampler interval, seconds")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-tracking-") as tmp:
        root = Path(tmp)
        data = prepare_stage_data(root, "causal_lm", block_size=128)
        timings = time_training(data, root, args)
        on, off = timings[True].wall, timings[False].wall
        cpu_on, cpu_off = timings[True].cpu, timings[False].cpu
        per_sample = sampler_seconds_per_sample()
        samples = on / args.interval + 1
        print(
            f"\ntraining with / without the sampler (medians): wall {on:.1f} / {off:.1f} s "
            f"= {on / off:.3f}; CPU {cpu_on:.1f} / {cpu_off:.1f} s = {cpu_on / cpu_off:.3f}"
        )
        print(
            f"sampler's own cost: {per_sample * 1e3:.2f} ms per sample x {samples:.0f} samples "
            f"= {per_sample * samples:.3f} s = {100 * per_sample * samples / on:.3f}% of training"
        )
        train_dir = root / "train-0-on"
        track_s = track_once(root, train_dir, evaluate(root, data, train_dir))
        print(
            f"track stage (new process, model logged and registered): {track_s:.1f} s "
            f"= {track_s / on:.2f} x training time (runs after training, not inside it)"
        )
        for what, megabytes in artifact_megabytes(root / "store").items():
            print(f"  {what}: {megabytes:.2f} MB")


if __name__ == "__main__":
    main()

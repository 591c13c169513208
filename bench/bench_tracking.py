"""What does tracking cost? Training makes no MLflow calls (results/ is the source of truth and
the track stage mirrors it afterwards), so inside training the only tracking code is the
system-metrics sampler thread. In one process:

1. the demo-lm model (config.yaml: GPT-2 2 x 128, batch 16 x 128 tokens, same seed) trained
   alternately with and without the sampler; prints each time, the medians and their ratio, and
   the sampler's own cost (time per sample x samples taken) as a share of training time;
2. the track stage as the rule runs it (`snaketune track` in a new process, into a fresh SQLite
   store, the model logged and registered), timed against the training time.

Data: the demo corpus through our data stages (snaketune.local.demo_config, BPE vocab 400).
Run: .venv/bin/python bench/bench_tracking.py [--steps 300] [--repeats 2] [--interval 5]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

DEMO_PROMPTS = ["Customer: I was charged twice for order #123456.\nAgent:"]


@dataclass(frozen=True)
class Timing:
    wall: float
    cpu: float
    """CPU seconds of this process, every thread (the sampler's included): unlike wall time,
    barely moved by other processes competing for the cores."""


def train_once(data, out: Path, steps: int, interval: float, sampler: bool) -> Timing:
    import snaketune.train as train
    from snaketune.settings import ModelSettings, TrainJob, TrainSettings
    from snaketune.system_metrics import sample_system_metrics

    def sampled(path, device=None):
        return sample_system_metrics(path, device, interval_s=interval)

    train.sample_system_metrics = sampled if sampler else (lambda *a, **k: contextlib.nullcontext())
    settings = TrainSettings(
        max_steps=steps, batch_size=16, lr=0.003, warmup_steps=30, eval_every=50, seed=1
    )
    model = ModelSettings(n_layer=2, n_embd=128, n_head=4, dropout=0.1)
    job = TrainJob(task="causal_lm", model=model, train=settings)
    wall, cpu = time.perf_counter(), time.process_time()
    train.train_model(data.train_paths(out), job)
    return Timing(time.perf_counter() - wall, time.process_time() - cpu)


def sampler_seconds_per_sample(samples: int = 200) -> float:
    import io

    from snaketune.system_metrics import Sampler, write_sample

    sampler, out = Sampler(), io.StringIO()
    started = time.perf_counter()
    for _ in range(samples):
        write_sample(out, sampler)
    return (time.perf_counter() - started) / samples


def evaluate(root: Path, data, train_dir: Path) -> Path:
    from snaketune.evaluation import evaluate_model
    from snaketune.settings import EvalJob, EvalSettings

    out = root / "evaluate"
    job = EvalJob("causal_lm", EvalSettings(prompts=DEMO_PROMPTS))
    evaluate_model(data.evaluate_paths(train_dir / "model", out), job)
    return out


def track_once(root: Path, data, train_dir: Path, eval_dir: Path) -> float:
    """`snaketune track` as the track rule runs it, timed as a new process."""
    from snaketune.settings import TrackSettings
    from snaketune.stages import TrackPaths, command_line

    store = root / "store"
    store.mkdir()
    config = {"name": "demo-lm", "dataset": "support-demo", "task": "causal_lm"}
    config["evaluate"] = {"max_new_tokens": 40}
    settings = TrackSettings(
        experiment="demo-lm",
        mlflow_experiment="bench-tracking",
        config=config,
        registered_model_name="bench-tracking.demo-lm",
    )
    paths = TrackPaths(
        **data.manifests,
        train=train_dir / "manifest.json",
        evaluate=eval_dir / "manifest.json",
        runs=root / "runs.json",
        store=store / "mlflow.db",
        artifacts=store / "artifacts",
        provenance=root / "provenance.json",
    )
    command = [str(Path(sys.executable).with_name("snaketune")), *command_line(paths, settings)]
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


def time_training(data, root: Path, args) -> dict[bool, Timing]:
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
    from snaketune import local

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--interval", type=float, default=5.0, help="sampler interval, seconds")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-tracking-") as tmp:
        root = Path(tmp)
        config = local.demo_config("causal_lm", block_size=128)
        data = local.prepare_data(config, local.DEMO_EXPERIMENT, root / "data")
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
        track_s = track_once(root, data, train_dir, evaluate(root, data, train_dir))
        print(
            f"track stage (new process, model logged and registered): {track_s:.1f} s "
            f"= {track_s / on:.2f} x training time (runs after training, not inside it)"
        )
        for what, megabytes in artifact_megabytes(root / "store").items():
            print(f"  {what}: {megabytes:.2f} MB")


if __name__ == "__main__":
    main()

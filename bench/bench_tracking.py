"""What does live tracking cost a training step? The demo-lm model (GPT-2 2 x 128, batch 16 x 128
tokens, same seed) trained by `snaketune.train.trainer.train_model`, the code the rule runs, in one
process, alternately:

1. off: no tracking folder (as a job outside the workflow);
2. live: logging to a real `mlflow server` on 127.0.0.1 (every log_every steps, system metrics
   every 5 s, through snaketune.track.live's background sender);
3. slow: the same server behind a relay that holds every answer back 1 s;
4. down: a tracking URI where nothing listens.

Prints, for each mode (medians of --repeats), the CPU seconds the live sender thread used (the
steadiest figure on a shared machine), the time per step in the steady state (between
the history's read points from step --settle on, as the rows' timestamps say), the whole call's
seconds (so the fixed cost: the sender imports mlflow and connects once per job, on a thread
that competes with training for this machine's 2 cores), the ratios to `off`, and how many
points each live run got onto the server before the call returned.

Data: the demo corpus through our data stages (snaketune.local.demo_config, BPE vocab 400).
Run: .venv/bin/python bench/bench_tracking.py [--steps 200] [--repeats 2]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the tests' relay (tests/support/reliability.py)

MODES = ("off", "live", "slow", "down")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(root: Path) -> tuple[str, subprocess.Popen]:
    port = free_port()
    mlflow = Path(sys.executable).with_name("mlflow")
    command = [str(mlflow), "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
               "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1",
               "--port", str(port), "--workers", "1"]  # fmt: skip
    log = (root / "server.log").open("wb")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=root)
    uri = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2):
                return uri, process
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")


@dataclass(frozen=True)
class Timing:
    step_s: float
    """Seconds per step after the settling steps."""
    call_s: float
    sent: int
    sender_cpu_s: float
    """CPU seconds of the live sender thread (its mlflow import and every request)."""


def train_once(data, out: Path, steps: int, uri: str | None, settle: int) -> Timing:
    """One train_model call: its steady-state step time, its whole time, the points sent."""
    from snaketune.context import IN_PROCESS, JobContext
    from snaketune.track import live, stage_log
    from snaketune.train.settings import ModelSettings, TrainJob, TrainSettings
    from snaketune.train.trainer import train_model

    context = IN_PROCESS  # no live tracking
    if uri is not None:
        folder = out / "tracking"
        folder.mkdir(parents=True)
        target = stage_log.Target(
            out.name, "bench-tracking", uri, "", str(out / "mlartifacts"), "bench"
        )
        target.write(folder)
        context = JobContext(tracking=folder)
    settings = TrainSettings(
        max_steps=steps, batch_size=16, lr=0.003, warmup_steps=30, eval_every=steps, seed=1
    )
    model = ModelSettings(n_layer=2, n_embd=128, n_head=4, dropout=0.1)
    job = TrainJob(task="causal_lm", model=model, train=settings)
    trackers = []
    original = live.Tracker.end

    def end(tracker, *args, **kwargs):
        original(tracker, *args, **kwargs)
        trackers.append(tracker)

    live.Tracker.end = end
    try:
        started = time.perf_counter()
        history = train_model(data.train_paths(out), job, context)
        seconds = time.perf_counter() - started
    finally:
        live.Tracker.end = original
    first = next(r for r in history if r["step"] >= settle)
    last = history[-1]
    step_s = (last["timestamp"] - first["timestamp"]) / (last["step"] - first["step"])
    sent, cpu = (trackers[0].sent, trackers[0].cpu_s) if trackers else (0, 0.0)
    return Timing(step_s, seconds, sent, cpu)


def main() -> None:
    from snaketune import local
    from tests.support.reliability import Relay
    from tests.support.servers import serving

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--settle", type=int, default=50, help="steps before the steady state")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-tracking-") as tmp:
        root = Path(tmp)
        config = local.demo_config("causal_lm", block_size=128)
        data = local.prepare_data(config, local.DEMO_EXPERIMENT, root / "data")
        (root / "server").mkdir()
        uri, server = start_server(root / "server")
        relay = Relay(uri)
        relay.delay_s = 1.0
        uris = {
            "off": None,
            "live": uri,
            "slow": relay.uri,
            "down": f"http://127.0.0.1:{free_port()}",
        }
        timings: dict[str, list[Timing]] = {m: [] for m in MODES}
        try:
            with serving(relay):
                train_once(data, root / "warm-up", 20, None, 10)  # imports, allocator growth
                for i in range(args.repeats):
                    order = MODES if i % 2 == 0 else tuple(reversed(MODES))
                    for mode in order:
                        out = root / f"{mode}-{i}"
                        t = train_once(data, out, args.steps, uris[mode], args.settle)
                        timings[mode].append(t)
                        print(f"{mode:>4}: {t.step_s * 1e3:7.1f} ms/step, call {t.call_s:.2f} s, "
                              f"{t.sent} points sent live, sender CPU {t.sender_cpu_s:.2f} s",
                              flush=True)  # fmt: skip
        finally:
            server.terminate()
            server.wait()
        step = {m: statistics.median(t.step_s for t in timings[m]) for m in MODES}
        call = {m: statistics.median(t.call_s for t in timings[m]) for m in MODES}
        cpu = {m: statistics.median(t.sender_cpu_s for t in timings[m]) for m in MODES}
        print(f"\n{args.steps} steps x {args.repeats}, medians, against tracking off:")
        for m in MODES:
            print(f"  {m:>4}: {step[m] * 1e3:7.1f} ms/step {step[m] / step['off']:.3f}x   "
                  f"call {call[m]:6.2f} s {call[m] / call['off']:.3f}x "
                  f"(+{call[m] - call['off']:.2f} s)   sender CPU {cpu[m]:.2f} s = "
                  f"{100 * cpu[m] / call['off']:.1f}% of the call")  # fmt: skip


if __name__ == "__main__":
    main()

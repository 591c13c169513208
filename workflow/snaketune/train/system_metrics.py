"""System metrics sampled while the model trains: CPU, memory and, on CUDA, the GPU.

A background thread writes samples to the train job's system_metrics file and hands each to
the stage's live tracker (snaketune.track.live, which sends it without the sampler ever waiting for
the server); the track stage uploads whatever did not arrive, under MLflow's `system/...` names
with their timestamps. Names follow MLflow's own system metrics monitor, so the UI groups them
the same way.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from snaketune.fileio import atomic_path

DEFAULT_INTERVAL_S = 5.0
_MB = 1e6


class Sampler:
    """One sample: CPU use since the previous sample, memory now, CUDA memory now."""

    def __init__(self, device=None):
        import psutil

        self.psutil = psutil
        self.process = psutil.Process()
        self.started = time.time()
        self.cuda_index = None
        if device is not None and getattr(device, "type", None) == "cuda":
            import torch

            self.cuda_index = device.index if device.index is not None else 0
            self.torch = torch
        # The first calls only start the measurements; each later one covers the time since.
        psutil.cpu_percent(interval=None)
        self.process.cpu_percent(interval=None)

    def sample(self) -> dict[str, float]:
        now = time.time()
        memory = self.psutil.virtual_memory()
        row = {
            "timestamp": now,
            "elapsed_s": round(now - self.started, 3),
            "cpu_utilization_percentage": self.psutil.cpu_percent(interval=None),
            # This process alone, in per cent of one core (2 busy threads: 200).
            "process_cpu_utilization_percentage": self.process.cpu_percent(interval=None),
            "process_rss_megabytes": self.process.memory_info().rss / _MB,
            "system_memory_usage_megabytes": memory.used / _MB,
            "system_memory_usage_percentage": memory.percent,
        }
        if self.cuda_index is not None:
            row.update(self._cuda())
        return row

    def _cuda(self) -> dict[str, float]:
        # Only the training device: querying others would create a CUDA context on each.
        cuda, i = self.torch.cuda, self.cuda_index
        free, total = cuda.mem_get_info(i)
        row = {
            f"gpu_{i}_memory_usage_megabytes": (total - free) / _MB,
            f"gpu_{i}_memory_usage_percentage": 100.0 * (total - free) / total,
            f"gpu_{i}_process_allocated_megabytes": cuda.memory_allocated(i) / _MB,
            f"gpu_{i}_process_peak_allocated_megabytes": cuda.max_memory_allocated(i) / _MB,
        }
        with contextlib.suppress(Exception):  # needs NVML (nvidia-ml-py), which may be missing
            row[f"gpu_{i}_utilization_percentage"] = float(cuda.utilization(i))
        return row


@contextlib.contextmanager
def sample_system_metrics(
    path: Path, device=None, tracker=None, interval_s: float = DEFAULT_INTERVAL_S
) -> Iterator[None]:
    """Sample every `interval_s` seconds while the block runs, and once when it ends (so even a
    short run has one sample, its CPU figure averaged over the whole block). The file appears
    under its final name only if the block succeeds; each sample also goes to the tracker (a
    snaketune.track.live tracker) as it is taken."""
    with atomic_path(path) as tmp, tmp.open("w") as out:
        sampler = Sampler(device)
        stop = threading.Event()
        taken = itertools.count()

        def write_sample(out: IO[str], sampler: Sampler) -> None:
            sample = sampler.sample()
            out.write(json.dumps(sample) + "\n")
            out.flush()
            if tracker is not None:
                tracker.log_sample(next(taken), sample)

        def loop() -> None:
            while not stop.wait(interval_s):
                write_sample(out, sampler)

        thread = threading.Thread(target=loop, name="system-metrics", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
        write_sample(out, sampler)


def read_samples(path: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]

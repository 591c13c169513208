"""System metrics sampled while training: a background thread's samples land in
system_metrics.jsonl only when the block succeeds, with MLflow's metric names; on CUDA the
training device's memory is sampled too."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import replace

import pytest
import torch

from snaketune.train.settings import ModelSettings, TrainSettings
from snaketune.train.system_metrics import (
    read_samples,
    sample_system_metrics,
)
from tests.support.stage_data import run_training, train_paths

SAMPLES = "system_metrics.jsonl"
CPU_NAMES = {
    "timestamp",
    "elapsed_s",
    "cpu_utilization_percentage",
    "process_cpu_utilization_percentage",
    "process_rss_megabytes",
    "system_memory_usage_megabytes",
    "system_memory_usage_percentage",
}


def test_samples_are_taken_every_interval_and_once_at_the_end(tmp_path):
    path = tmp_path / SAMPLES
    before = time.time()
    with sample_system_metrics(path, interval_s=0.05):
        time.sleep(0.3)
        assert not path.exists()  # written under a temporary name until the block ends
    samples = read_samples(path)
    assert len(samples) >= 3
    assert all(set(row) == CPU_NAMES for row in samples)
    times = [row["timestamp"] for row in samples]
    assert times == sorted(times) and before <= times[0] <= times[-1] <= time.time()
    assert all(0 <= row["cpu_utilization_percentage"] <= 100 for row in samples)
    assert all(row["process_rss_megabytes"] > 1 for row in samples)


def test_a_short_block_still_gets_one_sample(tmp_path):
    path = tmp_path / SAMPLES
    with sample_system_metrics(path, interval_s=60):
        pass
    assert len(read_samples(path)) == 1


def test_a_failing_block_leaves_no_file_and_no_thread(tmp_path):
    path = tmp_path / SAMPLES
    with pytest.raises(RuntimeError), sample_system_metrics(path, interval_s=0.01):
        raise RuntimeError("training failed")
    assert list(tmp_path.iterdir()) == []
    assert not any(t.name == "system-metrics" for t in threading.enumerate())


def test_cuda_device_memory_is_sampled_for_the_training_device(tmp_path, monkeypatch):
    """No GPU here: torch.cuda's queries are stood in for, to check what the sampler asks and
    under which names it writes the answers."""
    gib = 1 << 30
    asked = []

    def mem_get_info(index):
        asked.append(index)
        return 30 * gib, 80 * gib

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda index: 2 * gib)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda index: 3 * gib)
    monkeypatch.setattr(torch.cuda, "utilization", lambda index: 87)
    path = tmp_path / SAMPLES
    with sample_system_metrics(path, device=torch.device("cuda", 1), interval_s=60):
        pass
    (row,) = read_samples(path)
    assert set(asked) == {1}  # only the training device: others would get a CUDA context
    assert row["gpu_1_memory_usage_megabytes"] == pytest.approx(50 * gib / 1e6)
    assert row["gpu_1_memory_usage_percentage"] == pytest.approx(62.5)
    assert row["gpu_1_process_allocated_megabytes"] == pytest.approx(2 * gib / 1e6)
    assert row["gpu_1_process_peak_allocated_megabytes"] == pytest.approx(3 * gib / 1e6)
    assert row["gpu_1_utilization_percentage"] == 87.0


def test_missing_nvml_leaves_out_only_the_utilization(tmp_path, monkeypatch):
    def no_nvml(index):
        raise ModuleNotFoundError("pynvml does not seem to be installed")

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index: (1.0, 2.0))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda index: 0)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda index: 0)
    monkeypatch.setattr(torch.cuda, "utilization", no_nvml)
    path = tmp_path / SAMPLES
    with sample_system_metrics(path, device=torch.device("cuda"), interval_s=60):
        pass
    (row,) = read_samples(path)
    assert "gpu_0_memory_usage_percentage" in row
    assert "gpu_0_utilization_percentage" not in row


def test_training_writes_its_system_metrics_beside_the_history(lm_data, tmp_path):
    settings = replace(TrainSettings(), max_steps=3, batch_size=4, eval_every=3, warmup_steps=1)
    tiny = ModelSettings(n_layer=1, n_embd=16, n_head=2, dropout=0.0)
    run_training(lm_data, tmp_path, "causal_lm", tiny, settings)
    path = train_paths(lm_data, tmp_path).system_metrics
    assert path == tmp_path / SAMPLES
    samples = [json.loads(line) for line in path.read_text().splitlines()]
    assert samples and set(samples[-1]) == CPU_NAMES
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert samples[-1]["timestamp"] <= time.time() and manifest["counts"]["steps"] == 3

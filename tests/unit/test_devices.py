"""Where a job runs and in what precision, for training and evaluation alike. This machine has
no GPU: CUDA's answers (is a device visible, does it have bf16) are the one thing stood in for;
the decisions made from them are the real code."""

from __future__ import annotations

import os

import pytest
import torch

from snaketune.errors import TrainingError
from snaketune.train.devices import deterministic, place


@pytest.fixture
def gpu(monkeypatch):
    """A visible CUDA device; `gpu(bf16=False)` makes it one without bf16 (an older card)."""

    def make(bf16: bool = True) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
        monkeypatch.setattr(torch, "set_float32_matmul_precision", lambda value: None)

    return make


def test_the_cpu_trains_in_fp32_and_refuses_autocast_it_cannot_do():
    assert place("auto", "auto").device.type == "cpu" and place("auto", "auto").autocast is None
    for precision in ("bf16", "fp16"):
        with pytest.raises(TrainingError, match=rf"'{precision}' \(autocast on CUDA\) but"):
            place("auto", precision)
    with pytest.raises(TrainingError, match="no CUDA device is visible"):
        place("cuda", "auto")


def test_a_gpu_with_bf16_autocasts_to_bf16_on_the_processs_own_device(gpu):
    gpu()
    placement = place("auto", "auto", local_rank=1)
    assert placement.device == torch.device("cuda:1") and placement.autocast is torch.bfloat16
    assert not placement.scaled
    assert place("auto", "fp32").autocast is None
    assert place("cpu", "auto").device.type == "cpu"  # asked for the CPU: the CPU


def test_a_gpu_without_bf16_uses_fp16_with_a_scaler_and_refuses_bf16(gpu):
    gpu(bf16=False)
    placement = place("auto", "auto")
    assert placement.autocast is torch.float16 and placement.scaled
    with pytest.raises(TrainingError, match=r"Tesla T4 has no bf16: set train.precision: fp16"):
        place("auto", "bf16")


def test_deterministic_auto_is_exact_on_the_cpu_and_fast_on_cuda(gpu):
    assert deterministic("auto", place("auto", "auto")) is True
    gpu()
    assert deterministic("auto", place("auto", "auto")) is False
    assert deterministic(True, place("auto", "auto")) is True


def test_deterministic_kernels_are_switched_without_importing_the_compiler():
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from snaketune.train.devices import set_deterministic\n"
        "set_deterministic(True, compiling=False)\n"
        "assert torch.are_deterministic_algorithms_enabled()\n"
        "assert torch.is_deterministic_algorithms_warn_only_enabled()\n"
        "print('torch._inductor' in sys.modules)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "False"


def test_deterministic_kernels_fix_cublas_s_workspace_and_leave_a_chosen_one(monkeypatch):
    from snaketune.train.devices import set_deterministic

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    set_deterministic(False, compiling=False)
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    set_deterministic(True, compiling=False)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    set_deterministic(True, compiling=False)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    set_deterministic(False, compiling=False)  # as the other tests expect

"""bench/gpu_check.py is the one command for a GPU: it must run wherever CI runs. Without CUDA
it trains the tiny shape through the trainer and the bare loop and scores it, on the CPU."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.support.repo import REPO


@pytest.mark.slow
def test_the_gpu_check_runs_its_cpu_shape_and_prints_every_figure():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_check.py")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "tiny GPT-2 (2 x 64, context 64, vocab 512)" in out
    speeds = {
        label: float(value.replace(",", ""))
        for label, value in re.findall(
            r"^(bare torch loop|ours: train_model)\s+([\d,]+)", out, re.M
        )
    }
    assert set(speeds) == {"bare torch loop", "ours: train_model"} and min(speeds.values()) > 0
    assert re.search(r"matmul peak: [\d.]+ TFLOP/s measured \(float32 1024\^3\)", out)
    assert re.search(r"evaluation \(score_lm, stride context - 1\): [\d,]+ tokens/s", out)

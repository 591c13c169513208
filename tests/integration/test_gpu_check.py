"""bench/gpu_check.py is the one command for a GPU: it must run wherever CI runs. Without CUDA
it trains the tiny shape as the lean GPT and as GPT2LMHeadModel, each through the trainer and
the bare loop, and scores it, on the CPU, and writes the table as JSON."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from tests.support.repo import REPO


@pytest.mark.slow
def test_the_gpu_check_runs_its_cpu_shape_and_prints_every_figure(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    table_path = tmp_path / "table.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_check.py"), "--json", str(table_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "tiny GPT-2 (2 x 64, context 64, vocab 500; the lean GPT pads it to 512)" in out
    rows = re.findall(
        r"^(lean GPT|HF GPT-2)\s+(bare torch loop|ours: train_model)\s+8\s+([\d,]+)\s+([\d.]+)x",
        out,
        re.M,
    )
    assert {(model, loop) for model, loop, _, _ in rows} == {
        (model, loop)
        for model in ("lean GPT", "HF GPT-2")
        for loop in ("bare torch loop", "ours: train_model")
    }
    assert all(float(speed.replace(",", "")) > 0 for _, _, speed, _ in rows)
    assert re.search(r"matmul peak: [\d.]+ TFLOP/s measured \(float32 1024\^3\)", out)
    assert re.search(r"evaluation \(score_lm, stride context - 1\): [\d,]+ tokens/s", out)
    table = json.loads(table_path.read_text())
    assert [(r["model"], r["loop"], r["batch"]) for r in table["rows"]] == [
        (model, loop, 8) for model, loop, _, _ in rows
    ]
    assert all(r["tokens_per_s"] > 0 for r in table["rows"]) and table["eval_tokens_per_s"] > 0

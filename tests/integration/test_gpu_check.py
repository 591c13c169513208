"""bench/gpu_check.py is the one command for a GPU: it must run wherever CI runs. Without CUDA
it trains the tiny shape as the lean GPT and as GPT2LMHeadModel, each through the trainer and
the bare loop, at batch 8 and at batch auto, scores it eagerly each way, times the 5M
classifier, on the CPU, and writes the table as JSON."""

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
    # batch auto: ours searched the micro-batch (no memory limit on the CPU: all 64 examples of
    # a step in one), and the bare loop trained with what it found.
    auto = re.findall(
        r"^(lean GPT|HF GPT-2)\s+(bare torch loop|ours: train_model)\s+auto (\d+)\s+[\d,]+",
        out,
        re.M,
    )
    assert len(auto) == 4 and {found for _, _, found in auto} == {"64"}
    for what in ("score_lm, HF GPT-2, eager", "score_lm, lean GPT, eager"):
        assert re.search(rf"^{re.escape(what)}\s+[\d,]+\s+[\d.]+x$", out, re.M), what
    assert re.search(r"^score_lm, lean GPT, compiled\s+CUDA only", out, re.M)
    assert re.search(r"classifier \(4\.9M parameters, .*\): [\d.]+ ms per step", out)
    table = json.loads(table_path.read_text())
    assert [(r["model"], r["loop"], r["batch"]) for r in table["rows"]][:4] == [
        (model, loop, 8) for model, loop, _, _ in rows
    ]
    assert all(r["tokens_per_s"] > 0 for r in table["rows"])
    assert [r["micro_batch"] for r in table["rows"] if r["batch"] == "auto"] == [64] * 4
    speeds = {r["evaluation"]: r["tokens_per_s"] for r in table["evaluation"]}
    assert speeds["score_lm, HF GPT-2, eager"] > 0 and speeds["HF forward + fp32 CE, eager"] > 0
    assert table["classifier_ms_per_step"] > 0 and table["compile_cache"] is None

"""A three-point sweep over two keys, end to end on a tiny config: one data chain shared by
every point, a train/evaluate/track per point, and a comparison table and plot in results/, in
the Snakemake report and in MLflow, with every point's runs tagged with the sweep. It runs as
on a machine with two GPUs (declared in local_gpus; none needs to exist), one per train job:
train jobs running at once get disjoint CUDA_VISIBLE_DEVICES."""

from __future__ import annotations

import copy
import json
import re
import subprocess

import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient

from tests.support.workflow import MLFLOW_EXPERIMENT, snakemake, snakemake_command, tiny_config

pytestmark = pytest.mark.slow

SWEEP = {"grid": {"train.lr": [0.001, 0.005]}, "points": [{"train.lr": 0.003, "model.n_layer": 2}]}
POINTS = ["demo-lm.lr-0.001", "demo-lm.lr-0.005", "demo-lm.lr-0.003.n_layer-2"]


def sweep_config() -> dict:
    config = tiny_config()
    lm = copy.deepcopy(config["experiments"][0])
    lm["train"] = {**lm["train"], "max_steps": 20, "eval_every": 10, "checkpoint_every": 10}
    lm["sweep"] = SWEEP
    config["experiments"] = [lm]
    config["local_gpus"] = [0, 1]
    return config


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("sweep")
    (workdir / "config.yaml").write_text(yaml.safe_dump(sweep_config(), sort_keys=False))
    two_gpus = ("--cores", "4", "--resources", "gpu=2", "--set-resources", "train_model:gpu=1")
    run = subprocess.run(
        snakemake_command(workdir, *two_gpus), capture_output=True, text=True, timeout=900
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return workdir, run.stdout + run.stderr


def job_counts(output: str) -> dict[str, int]:
    table = output[output.index("Job stats:") :].split("\n\n")[0]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}


def test_the_points_share_one_data_chain_and_train_each(swept):
    _, output = swept
    counts = job_counts(output)
    for rule in ("download_dataset", "clean_corpus", "split_corpus", "prepare_tokenizer"):
        assert counts[rule] == 1, rule
    for rule in ("train_model", "evaluate_model", "track_experiment"):
        assert counts[rule] == 3, rule
    assert counts["summarize_sweep"] == 1


def test_train_jobs_running_at_once_have_gpus_of_their_own(swept):
    workdir, _ = swept
    jobs = []
    for name in POINTS:
        manifest = json.loads((workdir / "results" / name / "train" / "manifest.json").read_text())
        start = manifest["started_at"]
        jobs.append((manifest["cuda_visible_devices"], start, start + manifest["seconds"]))
    assert {devices for devices, _, _ in jobs} <= {"0", "1"}
    at_once = [
        (a, b) for i, a in enumerate(jobs) for b in jobs[i + 1 :] if a[1] < b[2] and b[1] < a[2]
    ]
    assert at_once, "no two train jobs ran at the same time"
    assert all(a[0] != b[0] for a, b in at_once)


def test_the_table_has_a_row_per_point_with_its_values_and_metrics(swept):
    workdir, _ = swept
    table = pd.read_csv(workdir / "results" / "sweeps" / "demo-lm" / "table.csv")
    assert list(table["experiment"]) == POINTS
    assert list(table["train.lr"]) == [0.001, 0.005, 0.003]
    assert table["model.n_layer"].tolist()[2] == 2 and table["model.n_layer"].isna().sum() == 2
    for name in POINTS:
        metrics = workdir / "results" / name / "evaluate" / "metrics.json"
        row = table[table["experiment"] == name].iloc[0]
        assert row["perplexity"] == pytest.approx(yaml.safe_load(metrics.read_text())["perplexity"])
    assert (workdir / "results" / "sweeps" / "demo-lm" / "sweep_plot.png").stat().st_size > 10_000


def test_the_sweep_is_in_mlflow_and_every_point_is_tagged(swept):
    workdir, _ = swept
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'results' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(MLFLOW_EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], max_results=500)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    (summary,) = [r for r in parents if r.data.tags.get("snaketune.sweep_summary") == "demo-lm"]
    assert {a.path for a in client.list_artifacts(summary.info.run_id)} == {
        "table.csv",
        "sweep_plot.png",
    }
    points = sorted(r.info.run_name for r in parents if r is not summary)
    assert points == sorted(POINTS)
    assert {r.data.tags.get("snaketune.track.sweep") for r in runs} == {"demo-lm"}  # children too


def test_the_report_holds_the_table_and_the_plot(swept):
    workdir, _ = swept
    report = workdir / "report.html"
    built = snakemake(workdir, "--report", str(report))
    assert built.returncode == 0, built.stderr[-2000:]
    html = report.read_text(errors="replace")
    assert "table.csv" in html and "sweep_plot.png" in html and "Sweeps" in html


def test_a_rerun_has_nothing_to_do(swept):
    workdir, _ = swept
    again = snakemake(workdir, "--dry-run")
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr


def test_results_hold_nothing_beside_the_experiments_that_an_experiment_could_be_named(swept):
    """names.RESULTS_LAYOUT, which no experiment may be named, is what results_dir really holds
    beside the experiments' folders (a sweep's run has every kind of entry)."""
    from snaketune.names import RESULTS_LAYOUT

    workdir, _ = swept
    entries = {path.name for path in (workdir / "results").iterdir()}
    assert entries - set(POINTS) <= set(RESULTS_LAYOUT)
    assert {"datasets", "shared", "sweeps", "mlflow.db"} <= entries

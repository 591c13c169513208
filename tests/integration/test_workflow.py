"""The real workflow, end to end, on a tiny config in a temp dir: every stage's outputs, plausible
metrics, the MLflow store's runs and artifacts, and a second invocation that has nothing to do."""

from __future__ import annotations

import json
import math
import shlex
import shutil
import subprocess

import pandas as pd
import pytest

from snaketune.manifest import TIMINGS
from snaketune.names import INSTRUCTION_COLUMNS
from tests.support.ui import (
    EXPANDER,
    GENAI_ONLY,
    REPORT_SCREENSHOTS,
    SCREENSHOTS,
    in_training_view,
    open_page,
    report_item,
    text_once_it_shows,
    without_assistant,
)
from tests.support.workflow import (
    MLFLOW_EXPERIMENT,
    STAGES,
    run_in_new_workdir,
    same_metrics,
    same_to_rounding,
    snakemake,
)

pytestmark = pytest.mark.slow


def test_every_stage_writes_outputs_and_a_manifest(finished_run):
    results, _ = finished_run
    assert (results / "datasets" / "support-demo" / "download" / "manifest.json").exists()
    for experiment in ("demo-lm", "demo-intent"):
        for stage in STAGES[1:]:
            manifest = json.loads((results / experiment / stage / "manifest.json").read_text())
            assert manifest["stage"] == stage
            assert manifest["versions"]["torch"] and manifest["seconds"] >= 0
        for split in ("train", "val", "test"):
            frame = pd.read_parquet(results / experiment / "split" / f"{split}.parquet")
            # demo-lm is instruction data: each document's prompt and response too.
            extra = list(INSTRUCTION_COLUMNS) if experiment == "demo-lm" else []
            assert list(frame.columns) == ["doc_id", "text", "label", *extra] and len(frame) > 0
            shards = sorted(
                (results / experiment / "tokenize" / "shards" / split).glob("*.parquet")
            )
            assert shards and len(pd.read_parquet(shards[0])) > 0
        assert (results / experiment / "train" / "model" / "model.safetensors").exists()
        assert len((results / experiment / "train" / "history.jsonl").read_text().splitlines()) > 1


def test_clean_report_counts_what_the_demo_corpus_needs_cleaned(finished_run):
    results, _ = finished_run
    report = json.loads((results / "demo-intent" / "clean" / "report.json").read_text())
    assert report["html_stripped"] > 0 and report["pii_redacted"]["email"] > 0
    assert report["removed"]["exact_duplicate"] > 0
    assert report["output_records"] == report["input_records"] - sum(report["removed"].values())


def test_metrics_are_plausible(finished_run):
    results, _ = finished_run
    lm = json.loads((results / "demo-lm" / "evaluate" / "metrics.json").read_text())
    assert math.isfinite(lm["perplexity"]) and 1 < lm["perplexity"] < 500  # vocab is 500
    assert 0 < lm["bits_per_byte"] < 8 and "stride" in lm["protocol"]
    # The Q&A generator: its answers scored beside the retrieval baseline's, every test answer.
    assert 1 < lm["answer_perplexity"] < 500 and lm["answers_cut_off"] == 0
    assert lm["answered_examples"] == lm["answer_rows"] == lm["test_rows"]
    for name in ("exact_match", "f1", "rouge_l"):
        assert 0 <= lm[name] <= 1 and 0 <= lm["baselines"]["retrieval"][name] <= 1
    answers = pd.read_csv(results / "demo-lm" / "evaluate" / "samples.csv", keep_default_na=False)
    assert (answers["reference"] != "").sum() == lm["answered_examples"]
    intent = json.loads((results / "demo-intent" / "evaluate" / "metrics.json").read_text())
    assert intent["accuracy"] > intent["baselines"]["majority_class"]["accuracy"] + 0.2
    assert intent["baselines"]["bow_logistic_regression"]["accuracy"] > 0.5
    assert len(intent["confusion_matrix"]) == len(intent["label_names"]) == 8
    first = pd.read_csv(results / "demo-intent" / "evaluate" / "samples.csv").iloc[0]
    assert first["label"] in intent["label_names"] and first["predicted"] in intent["label_names"]


def test_mlflow_store_has_a_parent_and_a_child_per_stage(finished_run):
    from mlflow import MlflowClient

    results, _ = finished_run
    client = MlflowClient(tracking_uri=f"sqlite:///{results / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(MLFLOW_EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id])
    parents = {r.info.run_name: r for r in runs if "mlflow.parentRunId" not in r.data.tags}
    assert sorted(parents) == ["demo-intent", "demo-lm"]
    for name, parent in parents.items():
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert sorted(r.info.run_name for r in children) == sorted(STAGES)
        assert parent.data.tags["git.commit"] and parent.data.tags["snaketune.config_hash"]
        assert "--configfile" in parent.data.tags["snakemake.command"]
        assert parent.data.params["task"] in ("causal_lm", "sequence_classification")
        train = next(r for r in children if r.info.run_name == "train")
        assert len(client.get_metric_history(train.info.run_id, "train.loss")) > 1
        artifacts = {a.path for a in client.list_artifacts(train.info.run_id)}
        assert {"manifest.json", "history.jsonl", "model"} <= artifacts
        runs_json = json.loads((results / name / "track" / "runs.json").read_text())
        assert runs_json["runs"]["parent"] == parent.info.run_id
    assert "accuracy" in " ".join(parents["demo-intent"].data.metrics)


def test_provenance_records_the_command_code_and_machine(finished_run):
    results, _ = finished_run
    record = json.loads((results / "provenance.json").read_text())
    assert record["command"].split()[0].endswith("snakemake") and "--cores" in record["command"]
    assert record["git.commit"] and record["host"] and record["versions"]["torch"]


def test_summary_names_results_and_the_mlflow_ui_command(finished_run):
    _, run = finished_run
    assert "mlflow ui --backend-store-uri sqlite:///" in run.stdout + run.stderr


def test_second_invocation_has_nothing_to_do(finished_run):
    results, _ = finished_run
    rerun = snakemake(results.parent, "--dry-run")
    assert rerun.returncode == 0
    assert "Nothing to be done" in rerun.stdout + rerun.stderr


def test_a_moved_checkout_has_nothing_to_do(finished_run, tmp_path):
    results, _ = finished_run
    moved = tmp_path / "elsewhere" / "workdir"
    shutil.copytree(results.parent, moved, symlinks=True)  # results, links and .snakemake
    rerun = snakemake(moved, "--dry-run")
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "Nothing to be done" in rerun.stdout + rerun.stderr, rerun.stdout[-3000:]
    shared = moved / "results" / "demo-lm" / "tokenize" / "manifest.json"
    assert shared.resolve().is_relative_to(moved)  # the experiment's links moved along


def test_html_report_shows_the_plots_and_tables_and_builds_without_warnings(finished_run, browser):
    results, _ = finished_run
    report = results.parent / "report.html"
    built = snakemake(results.parent, "--report", str(report))
    assert built.returncode == 0, built.stderr[-2000:]
    assert "WARNING" not in built.stdout + built.stderr  # docutils' warnings on the captions
    html = report.read_text(errors="replace")
    for name in ("loss_curve.png", "eval_plot.png", "metrics.html", "report.html", "samples.html"):
        assert name in html
    assert "Training loss per step" in html  # a caption
    assert "the retrieval baseline's answer" in html  # the samples table's caption

    # As a reader opens them: each table is shown in the report, not offered as a download.
    REPORT_SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    metrics = json.loads((results / "demo-lm" / "evaluate" / "metrics.json").read_text())
    shown = report_item(browser, report, "Evaluation", ("demo-lm", "metrics"))
    assert "metric this model kneser_ney_bigram retrieval" in shown  # a table's header row
    assert f"perplexity {metrics['perplexity']:.4g}" in shown and metrics["protocol"] in shown
    browser.save_screenshot(str(REPORT_SCREENSHOTS / "metrics.png"))
    shown = report_item(browser, report, "Evaluation", ("demo-lm", "samples"))
    assert "prompt generated" in shown and "Customer:" in shown
    browser.save_screenshot(str(REPORT_SCREENSHOTS / "samples.png"))
    shown = report_item(browser, report, "Evaluation", ("demo-intent", "metrics"))
    assert "Confusion matrix" in shown and "accuracy" in shown
    shown = report_item(browser, report, "Data", ("support-demo", "cleaning report"))
    assert "input_records" in shown and "removed.exact_duplicate" in shown
    browser.save_screenshot(str(REPORT_SCREENSHOTS / "cleaning.png"))


def _without(data: dict, *keys: str) -> dict:
    return {k: v for k, v in data.items() if k not in keys}


# The stages whose outputs a trained model's weights decide.
TRAINED = ("train", "evaluate")


def _digests_left_out(manifest: dict) -> dict:
    """A trained stage's manifest without what digests the weights (its inputs' and outputs'
    digests, and the run key made of them): any rounding changes those. The data they read is
    compared byte for byte on its own."""
    inputs = {name: {**entry, "sha256": ""} for name, entry in manifest["inputs"].items()}
    outputs = dict.fromkeys(manifest["outputs"], "")
    return {**_without(manifest, "run_key"), "inputs": inputs, "outputs": outputs}


def test_same_config_and_seed_give_identical_results(finished_run, tmp_path_factory):
    """The data stages' outputs are the same byte for byte. Training is the same to float
    rounding: two runs here once took different last bits in a gradient at step 1 (with the
    same loss), and Adam carries such a difference to 3e-4 in a weight by step 40, while the
    losses and metrics stay 1e-7 to 5e-6 apart (relative). So, as in the SLURM test, the
    models are compared through what they compute: every step's loss to 1e-5 (seen 9e-7
    apart), its gradient norm to 1e-3 (seen 1e-4: the gradient feels the weights' drift
    first), and the metrics as tests.support.workflow.same_metrics says."""
    first, _ = finished_run
    second, _ = run_in_new_workdir(tmp_path_factory)
    # Everything the stages wrote (MLflow's copies live under run ids, which differ by design).
    written = [p for p in first.rglob("*") if p.is_file() and "mlartifacts" not in p.parts]
    data = [p for p in written if p.suffix == ".parquet"]
    assert len(data) > 10
    for path in data:
        twin = second / path.relative_to(first)
        assert path.read_bytes() == twin.read_bytes(), path.relative_to(first)
    for path in (p for p in written if p.name == "manifest.json"):
        twin = second / path.relative_to(first)
        ours, theirs = (_without(json.loads(p.read_text()), *TIMINGS) for p in (path, twin))
        if set(path.relative_to(first).parts) & set(TRAINED):
            same_to_rounding(_digests_left_out(ours), _digests_left_out(theirs), path)
        else:
            assert ours == theirs, path
    for experiment in ("demo-lm", "demo-intent"):
        history = [
            [
                _without(json.loads(line), "tokens_per_s", "timestamp")
                for line in (root / experiment / "train" / "history.jsonl").read_text().splitlines()
            ]
            for root in (first, second)
        ]
        norms = [[row.pop("grad_norm") for row in rows] for rows in history]
        same_to_rounding(history[0], history[1], f"{experiment} history")  # losses, lr
        assert norms[0] == pytest.approx(norms[1], rel=1e-3), f"{experiment} gradient norms"
        metrics = [
            json.loads((root / experiment / "evaluate" / "metrics.json").read_text())
            for root in (first, second)
        ]
        same_metrics(metrics[0], metrics[1], f"{experiment} metrics")


# The MLflow UI as a reviewer sees it, against `mlflow ui` on the demo run's store.
@pytest.fixture(scope="module")
def mlflow_ui(finished_run):
    """The `mlflow ui` command the run's summary printed, on a free loopback port."""
    from tests.support.servers import free_port, stop, wait_until_healthy

    results, run = finished_run
    printed = next(line for line in (run.stdout + run.stderr).splitlines() if "mlflow ui " in line)
    # As printed (its mlflow by path: the tests' PATH, like a new shell's, lacks the venv), on
    # another port.
    command = shlex.split(printed.split("Start the MLflow UI: ", 1)[1])
    port = free_port()
    command[command.index("--port") + 1] = str(port)
    command += ["--workers", "1"]  # one server process starts faster on a busy machine
    log_path = results.parent / "mlflow-ui.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(uri, process, log_path)
        yield uri
    finally:
        stop(process)


def printed_runs_table(run: subprocess.CompletedProcess) -> str:
    """The runs-table URL the run's summary printed."""
    line = next(x for x in (run.stdout + run.stderr).splitlines() if "Browse the runs: " in x)
    return line.split("Browse the runs: ", 1)[1]


def test_mlflow_ui_shows_the_run_tree_a_metric_chart_and_the_artifacts(
    mlflow_ui, browser, finished_run
):
    from mlflow import MlflowClient

    from snaketune.track import stage_log

    results, run = finished_run
    client = MlflowClient(tracking_uri=mlflow_ui)
    experiment = client.get_experiment_by_name(MLFLOW_EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id])
    lm = next(r for r in runs if r.info.run_name == "demo-lm")
    train = next(
        r
        for r in runs
        if r.info.run_name == "train" and r.data.tags.get("mlflow.parentRunId") == lm.info.run_id
    )
    base = f"{mlflow_ui}/#/experiments/{experiment.experiment_id}"
    without_assistant(browser, mlflow_ui)

    # The printed URL (for the `mlflow ui` it printed, here on another port): the runs table in
    # model-training mode, not MLflow 3's GenAI overview, with the headline metrics as columns.
    printed = printed_runs_table(run).replace("http://127.0.0.1:5000", mlflow_ui)
    assert printed.startswith(f"{base}/runs?workflowType=machine_learning&viewStateShareKey=")
    browser.set_window_size(2400, 1000)  # every column on screen (the grid draws only those)
    columns = ("eval.perplexity", "eval.bits_per_byte", "eval.accuracy", "eval.macro_f1")
    table = open_page(
        browser, printed, "demo-lm", "demo-intent", f"{len(runs)} matching runs", *columns
    )
    assert in_training_view(table) and "Duration" in table
    metrics = json.loads((results / "demo-lm" / "evaluate" / "metrics.json").read_text())
    assert str(metrics["perplexity"])[:6] in table  # the parent row's value in its column
    browser.save_screenshot(str(SCREENSHOTS / "runs-headline-metrics.png"))
    # Each parent row's expander shows its child runs, one per stage.
    for expander in browser.find_elements("css selector", EXPANDER):
        expander.click()
    open_rows = text_once_it_shows(browser, *(f"\n{stage}\n" for stage in STAGES))
    assert open_rows.count("\ntrain\n") == 2  # one train run per experiment
    browser.save_screenshot(str(SCREENSHOTS / "runs.png"))
    browser.set_window_size(1400, 1000)

    # The parent run's description: what was trained on what, its metrics beside the baselines,
    # and links to its stage runs that open them in the model-training view.
    parent_page = f"{mlflow_ui}/{stage_log.run_link(experiment.experiment_id, lm.info.run_id)}"
    open_page(browser, parent_page, "Description", "Show more")
    browser.find_element("xpath", "//*[normalize-space(text())='Show more']").click()
    parent = text_once_it_shows(browser, "this model", "Show less")
    assert in_training_view(parent)
    assert "A causal_lm model trained by snaketune" in parent and "kneser_ney_bigram" in parent
    links = {a.get_attribute("href") for a in browser.find_elements("css selector", "a")}
    assert f"{mlflow_ui}/{stage_log.run_link(experiment.experiment_id, train.info.run_id)}" in links
    browser.save_screenshot(str(SCREENSHOTS / "parent-description.png"))

    run_page = f"{base}/runs/{train.info.run_id}"
    view = "?workflowType=machine_learning"
    overview = open_page(browser, run_page + view, "Parent run", "train.max_steps", "counts.steps")
    assert in_training_view(overview) and GENAI_ONLY not in overview
    assert "Parent run\ndemo-lm" in overview
    assert "train.loss" in overview and "git.commit" in overview
    browser.save_screenshot(str(SCREENSHOTS / "train-run.png"))

    # The train run's charts: the history (no chart of a single count among them).
    charts = open_page(browser, f"{run_page}/model-metrics{view}", "train (train.loss)")
    for key in ("train.loss", "train.val_loss", "train.lr", "train.tokens_per_s"):
        assert f"train ({key})" in charts
    for count in ("best_step", "parameters", "processes", "seconds", "steps", "train_rows"):
        assert f"\n{count}\n" not in charts and f"counts.{count}" not in charts
    assert "Step" in charts  # the charts' x axis: the per-step history, not a single value
    browser.save_screenshot(str(SCREENSHOTS / "train-charts.png"))
    open_page(browser, f"{run_page}/system-metrics{view}", "cpu_utilization_percentage")
    browser.save_screenshot(str(SCREENSHOTS / "train-system-metrics.png"))

    open_page(
        browser, f"{run_page}/artifacts{view}", "history.jsonl", "loss_curve.png", "manifest.json"
    )
    browser.save_screenshot(str(SCREENSHOTS / "train-artifacts.png"))

    # The registered model says what it holds; its version's description is the model card,
    # which opens with what the model is.
    model = json.loads((results / "demo-lm" / "track" / "runs.json").read_text())["model"]
    page = f"{mlflow_ui}/#/models/{model['name']}"
    open_page(browser, page + view, "causal_lm models of experiment demo-lm")
    browser.save_screenshot(str(SCREENSHOTS / "registered-model.png"))
    card = open_page(
        browser, f"{page}/versions/{model['version']}{view}", "Model: gpt2", "Protocol"
    )
    assert card.index("A causal_lm model trained by snaketune") < card.index("Protocol")
    browser.save_screenshot(str(SCREENSHOTS / "model-version.png"))

"""Reliability scenarios 24-34: nothing silent. Inputs changed in place, names that would become
paths outside results/, settings that cannot work together or would be ignored, other encodings,
unreadable records, labels written in several ways, markup-only text, a baseline that cannot
run, unusable tracking URIs and a job killed after its outputs appeared: each fails early and
clearly (the key, file or line, and what to do), or is handled, and never costs the last good
result nor ends in exit code 0 with a wrong one. Scenario 32 (serving) is in
tests/integration/test_serving.py. See README.md here."""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pytest
import yaml

from snaketune.config import cross_checks, validated
from snaketune.data.download import download_dataset
from snaketune.data.paths import DownloadPaths
from snaketune.data.settings import CleanSettings, DownloadSettings, ReadSettings
from snaketune.errors import CorpusError, DownloadError, TrainingError
from snaketune.evaluate.evaluation import baselines
from snaketune.fileio import sha256_file
from snaketune.stages import command_line
from snaketune.track.settings import TrackSettings
from snaketune.train.settings import ModelSettings, TrainJob, TrainSettings
from tests.support.mlflow_stores import write_stage_files
from tests.support.processes import kill_tree, wait_for
from tests.support.reliability import pipeline_config, run_snakemake
from tests.support.repo import DEMO_CORPUS, SNAKETUNE
from tests.support.servers import serving
from tests.support.stage_data import run_clean, run_training, train_paths
from tests.support.workflow import config_with, snakemake_command, snakemake_with, stage_folder

JSONL = ReadSettings(format="jsonl")


def jsonl(*records) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    run = subprocess.run(
        [SNAKETUNE, *args], capture_output=True, text=True, timeout=300, env=env or os.environ
    )
    assert "Traceback" not in run.stderr, run.stderr
    return run


# --- 24. a local dataset file changed in place ---------------------------------------------------


@pytest.mark.slow
def test_a_local_file_changed_after_its_download_is_refused_before_any_job_and_kept(tmp_path):
    source = tmp_path / "tickets.jsonl.gz"
    source.write_bytes(DEMO_CORPUS.read_bytes())
    config = config_with()
    config["datasets"] = {
        "local": {**config["datasets"]["support-demo"], "url": str(source)},
    }
    config["experiments"] = [{**config["experiments"][0], "dataset": "local"}]
    download = tmp_path / "results" / "datasets" / "local" / "download"
    target = str(download / "manifest.json")
    assert snakemake_with(tmp_path, config, "--cores", "1", target).returncode == 0
    verified = (download / "files" / "tickets.jsonl").read_bytes()

    os.utime(source)  # touched, not changed: nothing to do
    touched = snakemake_with(tmp_path, config, "--dry-run", target)
    assert touched.returncode == 0 and "Nothing to be done" in touched.stdout + touched.stderr

    source.write_bytes(gzip.compress(b'{"question": "edited", "intent": "x"}\n'))
    changed = snakemake_with(tmp_path, config, "--dry-run", target)
    new_digest = sha256_file(source)
    output = changed.stdout + changed.stderr
    assert changed.returncode != 0
    assert "datasets.local.url:" in output and "changed after it was verified" in output
    assert new_digest in output and config["datasets"]["local"]["sha256"] in output
    assert (download / "files" / "tickets.jsonl").read_bytes() == verified  # the copy is kept

    config["datasets"]["local"]["sha256"] = new_digest  # meant: the download runs again
    again = snakemake_with(tmp_path, config, "--dry-run", target)
    assert again.returncode == 0 and "download_dataset" in again.stdout


# --- 25. names that become paths -----------------------------------------------------------------


def test_a_dataset_name_that_would_leave_results_is_refused_before_any_job(tmp_path):
    config = config_with()
    config["datasets"]["../../escaped"] = config["datasets"].pop("support-demo")
    for exp in config["experiments"]:
        exp["dataset"] = "../../escaped"
    result = snakemake_with(tmp_path, config, "--cores", "1")
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "datasets: '../../escaped' is not a usable dataset name" in output
    assert not (tmp_path / "results").exists()
    assert not list(tmp_path.parent.glob("escaped*")) and not list(tmp_path.glob("**/escaped"))


def test_an_archive_member_outside_the_download_is_refused_by_key():
    config = validated(config_with())
    config["datasets"]["support-demo"]["member"] = "../../../etc/passwd"
    problems = cross_checks(config)
    assert any(
        p.startswith("datasets.support-demo.member: '../../../etc/passwd'") for p in problems
    )


def test_pick_member_refuses_a_path_leading_out_of_the_folder(tmp_path):
    from snaketune.data.clean import pick_member

    (tmp_path / "secret.txt").write_text("not data")
    (tmp_path / "raw").mkdir()
    with pytest.raises(CorpusError, match=r"'\.\./secret\.txt' is not a path inside"):
        pick_member(tmp_path / "raw", "../secret.txt")


# --- 26. settings the code cannot use together ---------------------------------------------------


def checkpoint_config(folder: Path, positions: int) -> Path:
    """A local checkpoint's config.json: all the checks before any job read of it."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(
        json.dumps({"model_type": "gpt2", "n_positions": positions})
    )
    return folder


def experiment(name: str, **sections) -> dict:
    base = {"name": name, "dataset": "support-demo", "task": "causal_lm"}
    return {**base, **sections}


@pytest.mark.slow
def test_settings_that_cannot_work_together_are_all_named_by_snakemake_before_any_job(tmp_path):
    checkpoint = str(checkpoint_config(tmp_path / "ckpt", positions=64))
    pretrained = {"init": "pretrained", "name_or_path": checkpoint}
    config = config_with()
    config["experiments"] = [
        experiment(
            "too-long",
            model=pretrained,
            tokenizer={"kind": "pretrained", "name_or_path": checkpoint},
            tokenize={"block_size": 128},
        ),
        experiment("lstm-pretrained", model={"arch": "lstm", **pretrained}),
        experiment("new-vocabulary", model=pretrained, tokenizer={"kind": "bpe"}),
        experiment(
            "ignored",
            model={"name_or_path": checkpoint, "lora_alpha": 8},
            tokenize={"max_length": 64},
            train={"precision": "bf16", "device": "cpu"},
            evaluate={"stride": 256},
        ),
        experiment(
            "sized-checkpoint",
            model={**pretrained, "n_layer": 4},
            tokenizer={"kind": "pretrained", "name_or_path": checkpoint, "vocab_size": 500},
            tokenize={"block_size": 64},
        ),
    ]
    result = snakemake_with(tmp_path, config, "--dry-run")
    output = result.stdout + result.stderr
    assert result.returncode != 0 and not (tmp_path / "results").exists()
    expected = [
        "experiments[0].tokenize.block_size: 128 tokens are more than model",
        "positions for (64); set it to at most 64",
        "experiments[1].model.init: the LSTM baseline trains from scratch only",
        "experiments[2].tokenizer.kind: 'bpe' trains a new vocabulary",
        "experiments[3].model.name_or_path: is set but model.init is 'scratch'",
        "experiments[3].model.lora_alpha: is ignored while model.lora_rank is 0",
        "experiments[3].tokenize.max_length: is a sequence_classification setting",
        "experiments[3].train.precision: 'bf16' is autocast on CUDA; train.device is 'cpu'",
        "experiments[3].evaluate.stride: 256 must be below the context length 128",
        "experiments[4].model.n_layer: is ignored when model.init is 'pretrained'",
        "experiments[4].tokenizer.vocab_size: trains a BPE and is ignored",
    ]
    for text in expected:
        assert text in output, text


def test_integer_settings_written_as_floats_reach_the_jobs_as_integers(tmp_path):
    config = config_with(experiments__0__train__max_steps=40.0)
    config["experiments"][0]["train"]["batch_size"] = 8.0
    result = snakemake_with(
        tmp_path, config, "--dry-run", "--printshellcmds", "--forceall", "--cores", "1"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    commands = result.stdout.splitlines()
    train = next(line for line in commands if " train --shards " in line and "demo-lm" in line)
    assert '"max_steps": 40,' in train and '"batch_size": 8,' in train


def test_a_job_refuses_settings_of_the_wrong_type_naming_the_key(lm_data, tmp_path):
    job = TrainJob("causal_lm", ModelSettings(n_layer=1, n_embd=16, n_head=2), TrainSettings())
    args = command_line(train_paths(lm_data, tmp_path), job)
    settings = json.loads(args[-1])
    settings["train"]["max_steps"] = "40"
    run = cli(*args[:-1], json.dumps(settings))
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1] == (
        "snaketune train: error: max_steps: '40' is not of type int"
    )


def test_rows_longer_than_a_pretrained_models_positions_are_refused_by_the_trainer(
    lm_data, tmp_path
):
    from snaketune.train.models import build_model

    short = build_model(
        ModelSettings(n_layer=1, n_embd=16, n_head=2), "causal_lm", 400, 16, 1, 0, []
    )
    short.save_pretrained(tmp_path / "short")
    model = ModelSettings(init="pretrained", name_or_path=str(tmp_path / "short"))
    with pytest.raises(TrainingError, match=r"rows of 32 tokens, but model .* positions for 16"):
        run_training(lm_data, tmp_path / "out", "causal_lm", model, TrainSettings(max_steps=1))
    assert not (tmp_path / "out" / "model").exists()


# --- 27. files that are not UTF-8 ----------------------------------------------------------------

LINES = ["Grüße aus Köln", "naïve café, crème brûlée", "Ça coûte 5 € — à la carte"]


@pytest.mark.parametrize("codec", ["utf-16", "utf-32", "utf-8-sig"])
def test_a_byte_order_mark_says_how_to_decode(tmp_path, codec):
    data = "\n".join(LINES).encode(codec)  # Python writes the mark for these codecs
    report, docs = run_clean(tmp_path, "a.txt", data)
    assert docs["text"].tolist() == LINES and report.undecodable_bytes_replaced == 0


def test_a_file_in_another_encoding_is_refused_naming_the_file_line_and_likely_encoding(tmp_path):
    data = ("plain first line\n" + "\n".join(LINES * 5)).encode("cp1252")
    with pytest.raises(CorpusError) as caught:
        run_clean(tmp_path, "a.txt", data)
    message = str(caught.value)
    assert str(tmp_path / "raw" / "a.txt") in message and "are not valid utf-8" in message
    assert "the first on line 2" in message and "it looks like cp1252 text" in message
    assert "datasets.<name>.encoding: cp1252" in message
    _, docs = run_clean(tmp_path, "a.txt", data, ReadSettings(format="txt", encoding="cp1252"))
    assert docs["text"].tolist()[1:4] == LINES


def test_utf16_without_a_mark_is_named_as_such(tmp_path):
    with pytest.raises(CorpusError, match=r"it looks like utf-16-le text"):
        run_clean(tmp_path, "a.txt", "\n".join(LINES).encode("utf-16-le"))


def test_an_unknown_encoding_is_refused_by_key():
    config = validated(config_with())
    config["datasets"]["support-demo"]["encoding"] = "klingon"
    problems = cross_checks(config)
    assert any(
        p.startswith("datasets.support-demo.encoding: 'klingon' is not a codec") for p in problems
    )


# --- 28. errors that say where ------------------------------------------------------------------


def test_a_malformed_jsonl_record_names_its_real_line(tmp_path):
    data = jsonl({"text": "one"}, {"text": "two"}) + b'{"text": "three" oops}\n'
    with pytest.raises(CorpusError, match=r"a\.jsonl, line 3: not valid JSON \(Expecting"):
        run_clean(tmp_path, "a.jsonl", data, JSONL)


def test_a_jsonl_line_that_is_not_an_object_says_what_it_is(tmp_path):
    data = jsonl({"text": "one"}, ["not", "an", "object"])
    with pytest.raises(CorpusError, match=r"line 2: a JSON list where a JSON object was expected"):
        run_clean(tmp_path, "a.jsonl", data, JSONL)


@pytest.mark.parametrize(
    ("name", "read"), [("a.jsonl", JSONL), ("a.csv", ReadSettings(format="csv"))]
)
def test_an_empty_file_says_it_holds_no_records(tmp_path, name, read):
    with pytest.raises(CorpusError, match=rf"{name} holds no records"):
        run_clean(tmp_path, name, b"\n\n", read)


def truncated(data: bytes) -> bytes:
    return data[: len(data) * 2 // 3]


@pytest.mark.parametrize("kind", ["gz", "zip"])
def test_a_truncated_archive_is_named_not_a_traceback(tmp_path, kind):
    text = b"".join(b'{"text": "line %d"}\n' % i for i in range(5000))
    if kind == "gz":
        packed = truncated(gzip.compress(text, mtime=0))
    else:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            archive.writestr("data/corpus.jsonl", text)
        packed = truncated(buffer.getvalue())
    source = tmp_path / f"corpus.{kind}"
    source.write_bytes(packed)
    settings = DownloadSettings(url=str(source), sha256=sha256_file(source))
    target = DownloadPaths(tmp_path / "files", tmp_path / "manifest.json")
    with pytest.raises(DownloadError) as caught:
        download_dataset(target, settings)
    assert f"corpus.{kind} cannot be unpacked" in str(caught.value)
    assert "truncated or damaged" in str(caught.value)
    assert not target.files.exists() and not target.manifest.exists()


def test_the_cli_reports_a_bad_record_in_one_line(tmp_path):
    from snaketune.data.paths import CleanPaths
    from snaketune.data.settings import CleanJob

    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.jsonl").write_bytes(b'{"text": "fine"}\n[1, 2]\n')
    paths = CleanPaths(raw, tmp_path / "c.parquet", tmp_path / "r.json", tmp_path / "m.json")
    run = cli(*command_line(paths, CleanJob(JSONL)))
    assert run.returncode == 1
    assert (
        run.stderr.strip()
        .splitlines()[-1]
        .startswith(f"snaketune clean: error: {raw / 'a.jsonl'}, line 2: a JSON list")
    )


# --- 29. labels that look alike -----------------------------------------------------------------


def test_labels_written_in_several_ways_are_one_class_and_the_report_lists_the_ways(tmp_path):
    labels = [1, "1", " 1 ", 1.0, True, "True", 0, False, "0.0", "billing", " billing"]
    records = [{"text": f"document number {i}", "label": y} for i, y in enumerate(labels)]
    read = ReadSettings(format="jsonl", label_column="label")
    report, docs = run_clean(tmp_path, "a.jsonl", jsonl(*records), read)
    assert sorted(set(docs["label"])) == ["0", "1", "billing"]
    assert report.labels == {"1": 6, "0": 3, "billing": 2}
    assert report.label_forms == {
        "0": ["0", "0.0", "False"],
        "1": [" 1 ", "1", "1.0", "True"],
        "billing": [" billing", "billing"],
    }


# --- 30. markup-only text -----------------------------------------------------------------------


def test_a_corpus_of_markup_and_whitespace_only_is_an_empty_corpus(tmp_path):
    data = jsonl({"text": "&nbsp;"}, {"text": " &nbsp; &#160; "}, {"text": "<br/>&nbsp;"})
    with pytest.raises(CorpusError, match=r"cleaning removed all 3 records.*'too_short'"):
        run_clean(tmp_path, "a.jsonl", data, JSONL, CleanSettings(strip_html=True))


# --- 31. a baseline that cannot run -------------------------------------------------------------


def test_a_baseline_that_cannot_run_is_reported_as_skipped_not_fatal(tmp_path):
    for name, texts in (("train", ["a", "b", "c", "d"]), ("test", ["a", "b"])):
        labels = ["x", "y"] * (len(texts) // 2)
        frame = pd.DataFrame({"doc_id": texts, "text": texts, "label": labels})
        frame.to_parquet(tmp_path / f"{name}.parquet")
    result = baselines(tmp_path / "train.parquet", tmp_path / "test.parquet", ["x", "y"])
    assert result["majority_class"]["accuracy"] == 0.5
    assert result["bow_logistic_regression"]["skipped"].startswith("no bag of words could be")


# --- 33. tracking URIs --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("file:///tmp/mlruns", "is a file store, which MLflow 3 no longer takes new runs in"),
        ("./mlruns", "is a file store"),
        ("ftp://example.org/runs", "has scheme 'ftp'; MLflow stores are"),
    ],
)
def test_an_unusable_tracking_uri_is_refused_before_any_job(tmp_path, uri, expected):
    result = snakemake_with(tmp_path, config_with(mlflow__tracking_uri=uri), "--dry-run")
    output = result.stdout + result.stderr
    assert result.returncode != 0 and f"mlflow.tracking_uri: {uri} {expected}" in output


def test_the_environments_tracking_uri_is_checked_before_any_job_too(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "file:///tmp/mlruns")
    result = snakemake_with(tmp_path, config_with(), "--dry-run")
    assert result.returncode != 0
    assert "MLFLOW_TRACKING_URI (environment): file:///tmp/mlruns is a file store" in (
        result.stdout + result.stderr
    )


class Unauthorized(BaseHTTPRequestHandler):
    """A tracking server that is up but takes no credentials (its /health answers)."""

    def do_GET(self):  # noqa: N802
        self._answer()

    do_POST = do_GET

    def _answer(self):
        ok = self.path.startswith("/health")
        body = b"OK" if ok else b"You are not authenticated."
        self.send_response(200 if ok else 401)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def track_cli(tmp_path: Path, uri: str) -> subprocess.CompletedProcess:
    inputs = write_stage_files(tmp_path / "results")
    settings = TrackSettings(experiment="demo-lm", mlflow_experiment="silent", tracking_uri=uri)
    env = {**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    return cli(*command_line(inputs.paths(tmp_path / "runs.json"), settings), env=env)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("file:///tmp/mlruns", "is a file store"),
        ("ftp://example.org", "has scheme 'ftp'"),
        ("http://127.0.0.1:{port}", "refused the credentials (HTTP 401)"),
    ],
    ids=["file", "unknown-scheme", "wrong-credentials"],
)
def test_every_unusable_store_ends_the_track_job_in_one_error_line(
    tmp_path, no_proxy, uri, expected
):
    with serving(ThreadingHTTPServer(("127.0.0.1", 0), Unauthorized)) as server:
        run = track_cli(tmp_path, uri.format(port=server.server_address[1]))
    last = run.stderr.strip().splitlines()[-1]
    assert run.returncode == 1
    assert last.startswith("snaketune track: error: ") and expected in last
    assert not (tmp_path / "runs.json").exists()


# --- 34. a job killed after its outputs appeared -------------------------------------------------


@pytest.mark.slow
def test_a_partition_killed_before_it_was_recorded_is_refused_then_rerun(tmp_path):
    """With tokenize.partitions: auto the partition jobs appear once the plan (a checkpoint) has
    run; Snakemake's incomplete-output check does not see them, the workflow does."""
    config = pipeline_config(["demo-lm"])
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    tokenize = stage_folder(config, "demo-lm", "tokenize")
    parts = tmp_path / tokenize / "parts"
    target = str(tokenize / "manifest.json")
    with (tmp_path / "killed.log").open("w") as log:
        first = subprocess.Popen(
            snakemake_command(tmp_path, "--cores", "1", target), stdout=log, stderr=log
        )
    wait_for(lambda: any(parts.glob("*/*.json")) or first.poll() is not None, 300, 0.001)
    assert first.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
    kill_tree(first.pid)
    first.wait()
    (killed,) = parts.glob("*/*.json")  # its manifest is there: the job looks done

    plain = run_snakemake(tmp_path, "--dry-run", target)
    assert plain.returncode != 0
    assert "seem to be incomplete" in plain.stdout + plain.stderr
    assert str(killed.relative_to(tmp_path)) in plain.stdout + plain.stderr

    run_snakemake(tmp_path, "--unlock")
    rerun = run_snakemake(tmp_path, "--cores", "1", "--rerun-incomplete", target)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "rule tokenize_partition:" in rerun.stdout + rerun.stderr
    assert (tmp_path / target).exists()
    again = run_snakemake(tmp_path, "--dry-run", target)
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr

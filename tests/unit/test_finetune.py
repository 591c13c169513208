"""Fine-tuning from saved checkpoints (GPT-2 and BERT), LoRA, early stopping, attention and
compile switches, and multi-process DDP."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from snaketune.errors import ModelError
from snaketune.train.models import BASE_MODEL, build_model, load_trained
from snaketune.train.settings import ModelSettings, TrainJob, TrainSettings
from tests.support.checkpoints import bert_checkpoint
from tests.support.stage_data import padded, rows_of, run_training, train_cli_args

TINY = ModelSettings(n_layer=1, n_embd=32, n_head=2, dropout=0.0)
QUICK = TrainSettings(
    max_steps=40, batch_size=8, lr=5e-3, warmup_steps=4, eval_every=20, checkpoint_every=20
)


def counts(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())["counts"]


@pytest.fixture(scope="module")
def pretrained_lm(lm_data, tmp_path_factory) -> Path:
    """A small GPT-2 trained on the demo corpus and saved with save_pretrained (+ tokenizer)."""
    out = tmp_path_factory.mktemp("pretrained-lm")
    run_training(lm_data, out, "causal_lm", TINY, replace(QUICK, max_steps=80))
    return out / "model"


def test_finetuning_starts_from_the_pretrained_weights(lm_data, pretrained_lm, tmp_path):
    start = ModelSettings(init="pretrained", name_or_path=str(pretrained_lm))
    history = run_training(
        lm_data, tmp_path, "causal_lm", start, replace(QUICK, max_steps=5, lr=1e-4, warmup_steps=1)
    )
    scratch = run_training(
        lm_data, tmp_path / "scratch", "causal_lm", TINY, replace(QUICK, max_steps=1)
    )
    # A fresh model starts near ln(vocab); the loaded one starts where pre-training ended.
    assert scratch[0]["loss"] > math.log(400) - 0.5
    assert history[0]["loss"] < scratch[0]["loss"] - 1.0


@pytest.mark.parametrize("merged", [False, True], ids=["adapter", "merged"])
def test_lora_trains_adapters_only_and_saves_the_adapter_or_the_merged_model(
    lm_data, pretrained_lm, tmp_path, merged
):
    lora = ModelSettings(
        init="pretrained",
        name_or_path=str(pretrained_lm),
        lora_rank=4,
        lora_alpha=8,
        lora_target_modules=["c_attn"],
        save_merged=merged,
    )
    history = run_training(
        lm_data, tmp_path, "causal_lm", lora, replace(QUICK, max_steps=20, lr=1e-2)
    )
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert counts(tmp_path)["parameters"] > 0 and len(history) == 20
    assert 0 < counts(tmp_path)["trainable_parameters"] < counts(tmp_path)["parameters"] / 10
    assert manifest["saved_model"] == ("whole" if merged else "adapter")
    folder = tmp_path / "model"
    loaded = load_trained(folder, "causal_lm")
    base = load_trained(pretrained_lm, "causal_lm").state_dict()
    if merged:
        tuned = loaded.state_dict()
        assert not any("lora" in name for name in tuned)  # adapters merged into plain weights
    else:
        # The adapter alone, and where its base is: a small fraction of the base's bytes.
        assert not (folder / "model.safetensors").exists()
        adapter = (folder / "adapter_model.safetensors").stat().st_size
        assert adapter < (pretrained_lm / "model.safetensors").stat().st_size / 10
        record = json.loads((folder / BASE_MODEL).read_text())
        assert record["name_or_path"] == str(pretrained_lm) and record["source_digest"]
        tuned = loaded.merge_and_unload().state_dict()
    changed = [n for n in base if not torch.equal(base[n], tuned[n])]
    assert changed and all("c_attn" in n for n in changed)


def test_an_adapter_does_not_load_on_a_base_that_changed(lm_data, pretrained_lm, tmp_path):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(pretrained_lm, base)
    lora = ModelSettings(init="pretrained", name_or_path=str(base), lora_rank=2)
    run_training(lm_data, tmp_path / "run", "causal_lm", lora, replace(QUICK, max_steps=2))
    load_trained(tmp_path / "run" / "model", "causal_lm")
    (base / "config.json").write_text((base / "config.json").read_text().replace("}", " }"))
    with pytest.raises(ModelError, match="whose files have changed since"):
        load_trained(tmp_path / "run" / "model", "causal_lm")


def test_early_stopping_stops_after_patience_and_keeps_the_best(lm_data, tmp_path):
    # lr = 0 leaves the weights as they are, so the val loss never improves after the first
    # evaluation: training must stop `patience` evaluations later.
    settings = replace(QUICK, max_steps=100, lr=0.0, eval_every=5, early_stopping_patience=2)
    history = run_training(lm_data, tmp_path, "causal_lm", TINY, settings)
    assert len(history) == 15
    stats = counts(tmp_path)
    assert stats["stopped_early"] is True and stats["best_step"] == 5
    assert stats["best_val_loss"] == pytest.approx(history[4]["val_loss"])


def test_sdpa_and_eager_attention_compute_the_same_logits():
    ids = torch.randint(0, 100, (2, 16))
    models = {}
    for attention in ("eager", "sdpa"):
        torch.manual_seed(0)
        models[attention] = build_model(
            replace(TINY, attention=attention), "causal_lm", 100, 16, 0, 0, []
        ).eval()
        assert models[attention].config._attn_implementation == attention
    with torch.no_grad():
        torch.testing.assert_close(
            models["eager"](input_ids=ids).logits,
            models["sdpa"](input_ids=ids).logits,
            atol=1e-5,
            rtol=1e-5,
        )
    auto = build_model(TINY, "causal_lm", 100, 16, 0, 0, [])
    assert auto.config._attn_implementation == "sdpa"  # auto: sdpa, measured no slower on CPU


@pytest.mark.slow
def test_torch_compile_trains_like_eager_and_a_second_job_loads_the_cached_graphs(
    lm_data, tmp_path
):
    """Two compiling jobs of the same shape, one process each, sharing a compile cache (as the
    workflow's jobs share <results_dir>/shared/compile_cache): the first compiles and stores
    its graphs, the second finds them; both train as eager does, validation included."""
    from snaketune.train.compile_cache import CACHE_VARIABLE

    settings = replace(QUICK, max_steps=3, warmup_steps=1, eval_every=3, checkpoint_every=3)
    cache = tmp_path / "cache"
    env = {**os.environ, CACHE_VARIABLE: str(cache), "OMP_NUM_THREADS": "1"}
    job = TrainJob("causal_lm", TINY, replace(settings, compile=True))
    caches = []
    for name in ("first", "second"):
        command = [
            sys.executable,
            "-m",
            "snaketune.cli",
            *train_cli_args(lm_data, tmp_path / name, job),
        ]
        run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        caches.append(json.loads((tmp_path / name / "manifest.json").read_text())["compile_cache"])
    first, second = caches
    assert first["folder"] == second["folder"] == str(cache)
    assert first["fx_graph"]["misses"] > 0 and first["fx_graph"]["hits"] == 0
    assert second["fx_graph"]["hits"] >= first["fx_graph"]["misses"]
    assert second["aot_autograd"]["hits"] > 0

    plain = run_training(lm_data, tmp_path / "plain", "causal_lm", TINY, settings)
    for name in ("first", "second"):
        compiled = [json.loads(line) for line in (tmp_path / name / "history.jsonl").open()]
        assert [r["loss"] for r in compiled] == pytest.approx([r["loss"] for r in plain], rel=1e-3)
        assert compiled[-1]["val_loss"] == pytest.approx(plain[-1]["val_loss"], rel=1e-4)


def test_bert_classifier_fine_tunes_from_a_local_checkpoint(classification_data, tmp_path):
    from snaketune.data.paths import TokenizerPaths
    from snaketune.data.settings import TokenizerSettings
    from snaketune.data.tokenizer import prepare_tokenizer
    from snaketune.tokenize.one_process import tokenize_in_one_process
    from snaketune.tokenize.settings import TokenizeJob, TokenizeSettings

    checkpoint = bert_checkpoint(classification_data["splits"]["train"], tmp_path / "bert")
    splits = classification_data["splits"]
    prepare_tokenizer(
        TokenizerPaths(splits["train"], tmp_path / "tok", tmp_path / "tok.json"),
        TokenizerSettings(kind="pretrained", name_or_path=str(checkpoint)),
    )
    tokenize_in_one_process(
        splits,
        tmp_path / "tok",
        tmp_path / "shards",
        tmp_path / "shards.json",
        TokenizeJob("sequence_classification", TokenizeSettings(max_length=32)),
    )
    rows = rows_of(classification_data, "test", tmp_path / "shards", tmp_path / "shards.json")
    test = padded(rows)
    first, lengths = test["input_ids"][:, 0], test["attention_mask"].sum(1)
    last = test["input_ids"][torch.arange(len(rows)), lengths - 1]
    assert (first == 2).all() and (last == 3).all()  # [CLS] ... [SEP], truncation included

    data = {**classification_data, "tokenizer": tmp_path / "tok"}
    model = ModelSettings(init="pretrained", name_or_path=str(checkpoint))
    run_training(
        data,
        tmp_path / "out",
        "sequence_classification",
        model,
        replace(QUICK, max_steps=200, batch_size=32, lr=2e-3, eval_every=50),
        shards=tmp_path / "shards",
        manifest=tmp_path / "shards.json",
    )
    from snaketune.evaluate.evaluation import predict_classes

    tuned = load_trained(tmp_path / "out" / "model", "sequence_classification")
    assert tuned.config.model_type == "bert" and tuned.config.num_labels == 8
    accuracy = (predict_classes(tuned, rows, 64) == rows.labels()).mean()
    assert accuracy > 0.5  # chance is 1/8; about 0.85 when it learns


def _torchrun_command(
    data: dict, out: Path, settings: TrainSettings, processes: int, model=TINY
) -> list[str]:
    job = TrainJob(task="causal_lm", model=model, train=settings)
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    launcher = [torchrun, "--standalone", f"--nproc_per_node={processes}", "-m", "snaketune.cli"]
    return [*launcher, *train_cli_args(data, out, job)]


def _torchrun_train(data: dict, out: Path, settings: TrainSettings, processes: int, model=TINY):
    command = _torchrun_command(data, out, settings, processes, model)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
def test_two_nodes_of_one_process_match_one_process_with_twice_the_batch(lm_data, tmp_path):
    """Two torchrun agents (nnodes=2) joined by a c10d rendezvous on 127.0.0.1, as
    snaketune.train.launch starts them off SLURM."""
    settings = replace(QUICK, max_steps=12, eval_every=6, checkpoint_every=6)
    nodes = replace(settings, batch_size=4, nodes=2)
    job = TrainJob(task="causal_lm", model=TINY, train=nodes)
    command = [
        sys.executable,
        "-m",
        "snaketune.train.launch",
        "2",
        "1",
        *train_cli_args(lm_data, tmp_path / "nodes", job),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("SLURM_JOB_ID", None)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    single = run_training(
        lm_data, tmp_path / "single", "causal_lm", TINY, replace(settings, batch_size=8)
    )
    history = (tmp_path / "nodes" / "history.jsonl").read_text().splitlines()
    two = [json.loads(x)["loss"] for x in history]
    assert two == pytest.approx([r["loss"] for r in single], abs=1e-4)
    assert counts(tmp_path / "nodes")["processes"] == 2


def history_of(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "history.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_fsdp_trains_like_ddp_and_saves_a_plain_model(lm_data, tmp_path):
    """FSDP2 over 2 processes (gloo on the CPU): the losses and weights of DDP with the same
    processes and batch."""
    settings = replace(QUICK, max_steps=12, eval_every=6, checkpoint_every=6, batch_size=4)
    settings = replace(settings, processes=2)
    _torchrun_train(lm_data, tmp_path / "ddp", settings, 2)
    _torchrun_train(lm_data, tmp_path / "fsdp", replace(settings, strategy="fsdp"), 2)
    ddp, fsdp = history_of(tmp_path / "ddp"), history_of(tmp_path / "fsdp")
    assert [r["loss"] for r in fsdp] == pytest.approx([r["loss"] for r in ddp], abs=1e-5)
    model = load_trained(tmp_path / "fsdp" / "model", "causal_lm")  # whole, not shards
    reference = load_trained(tmp_path / "ddp" / "model", "causal_lm")
    for (name, a), (_, b) in zip(
        model.state_dict().items(), reference.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_multi_process_run_with_dropout_killed_and_resumed_ends_as_the_uninterrupted_one(
    lm_data, tmp_path, strategy
):
    """Each process draws its own dropout masks, and each one's random state is in the
    checkpoint: the resumed run is the uninterrupted one, weight for weight."""
    import time

    from safetensors.torch import load_file

    from tests.support.processes import kill_tree

    dropout = replace(TINY, dropout=0.2)
    # Steps of a tiny model take a millisecond or two: many, so that the kill lands mid-run.
    settings = replace(QUICK, max_steps=300, eval_every=100, checkpoint_every=10, batch_size=4)
    settings = replace(settings, processes=2, strategy=strategy)
    _torchrun_train(lm_data, tmp_path / "straight", settings, 2, dropout)
    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen(
        _torchrun_command(lm_data, killed, settings, 2, dropout),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    record = killed / "state" / "checkpoint.json"
    deadline = time.monotonic() + 300
    while not record.exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    kill_tree(job.pid)  # the launcher and both processes (in sessions of their own)
    job.wait()
    assert not (killed / "model").exists(), "training finished before it could be killed"
    _torchrun_train(lm_data, killed, settings, 2, dropout)
    manifest = json.loads((killed / "manifest.json").read_text())
    assert 0 < manifest["counts"]["resumed_from_step"] < settings.max_steps
    straight = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    resumed = load_file(killed / "model" / "model.safetensors")
    for name in straight:
        torch.testing.assert_close(straight[name], resumed[name], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_two_ddp_processes_match_one_process_with_twice_the_batch(lm_data, tmp_path):
    """Both read the same memory-mapped token arrays (the processes share their pages)."""
    settings = replace(QUICK, max_steps=12, eval_every=6, checkpoint_every=6)
    _torchrun_train(lm_data, tmp_path / "ddp", replace(settings, batch_size=4, processes=2), 2)
    single = run_training(
        lm_data, tmp_path / "single", "causal_lm", TINY, replace(settings, batch_size=8)
    )
    ddp = [json.loads(x) for x in (tmp_path / "ddp" / "history.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in ddp] == pytest.approx([r["loss"] for r in single], abs=1e-4)
    assert counts(tmp_path / "ddp")["processes"] == 2
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == sorted(
        [
            "model",
            "history.jsonl",
            "loss_curve.png",
            "manifest.json",
            "system_metrics.jsonl",
            "state",
        ]
    )  # the state: the final checkpoint, kept so that a larger max_steps continues


def test_gradient_checkpointing_trains_the_same_steps(lm_data, tmp_path):
    """Activations recomputed in the backward pass (with the same dropout masks) give the
    losses of keeping them."""
    settings = replace(QUICK, max_steps=6, eval_every=3, checkpoint_every=3)
    dropout = replace(TINY, dropout=0.1)
    kept = run_training(lm_data, tmp_path / "kept", "causal_lm", dropout, settings)
    recomputed = run_training(
        lm_data,
        tmp_path / "recomputed",
        "causal_lm",
        replace(dropout, gradient_checkpointing=True),
        settings,
    )
    for name, on in (("kept", False), ("recomputed", True)):
        manifest = json.loads((tmp_path / name / "manifest.json").read_text())
        assert manifest["activation_checkpointing"] is on
    model = load_trained(tmp_path / "recomputed" / "model", "causal_lm")
    assert not model.is_activation_checkpointing  # a training setting: the saved model is plain
    assert [r["loss"] for r in recomputed] == pytest.approx([r["loss"] for r in kept], abs=1e-6)
    assert [r["grad_norm"] for r in recomputed] == pytest.approx(
        [r["grad_norm"] for r in kept], rel=1e-5
    )


def test_gradient_checkpointing_with_adapters_takes_the_same_gradients():
    """Recomputing each block in the backward pass (non-reentrant) works under LoRA, whose
    base is frozen: the adapters' gradients are those of the plain pass."""
    from snaketune.train.lm_loss import with_chunked_loss
    from snaketune.train.models import apply_lora
    from tests.support.families import tiny_causal_lm

    settings = ModelSettings(init="pretrained", name_or_path="-", lora_rank=4, dropout=0.0)
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = tiny_causal_lm("llama", 100)
        if checkpointing:
            model.activation_checkpointing_enable({"use_reentrant": False})
        model = apply_lora(model, settings, "causal_lm").train()
        assert model.get_base_model().is_activation_checkpointing == checkpointing
        with_chunked_loss(model)(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0] and grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="4-bit weights need CUDA (bitsandbytes)")
def test_a_4bit_base_trains_its_adapters_on_cuda(tmp_path):
    """QLoRA's path: a pretrained Llama loaded in 4 bits, adapters trained over it, the adapter
    saved alone and loaded back quantized. Runs where a GPU is lent."""
    pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes installed")
    from snaketune.train.lm_loss import with_chunked_loss
    from snaketune.train.models import apply_lora, is_quantized, save_adapter
    from tests.support.families import tiny_causal_lm

    tiny_causal_lm("llama", 128).save_pretrained(tmp_path / "base")
    settings = ModelSettings(
        init="pretrained", name_or_path=str(tmp_path / "base"), lora_rank=4, quantization="4bit"
    )
    model = apply_lora(
        build_model(settings, "causal_lm", 128, 16, 0, 0, [], "cuda"), settings, "causal_lm"
    )
    assert is_quantized(model)
    ids = torch.randint(0, 128, (2, 16), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = with_chunked_loss(model)(input_ids=ids, labels=ids).loss
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    save_adapter(model, settings, tmp_path / "adapter", "")
    assert is_quantized(load_trained(tmp_path / "adapter", "causal_lm", "cuda"))


def test_a_quantized_base_whose_embedding_would_grow_is_refused_before_loading(tmp_path):
    """New token rows could be kept only by merging them into quantized weights, which rounds
    them: refused from the checkpoint's config, before any weight is read (so on the CPU too)."""
    from tests.support.families import tiny_causal_lm

    tiny_causal_lm("llama", 128).save_pretrained(tmp_path / "base")
    settings = ModelSettings(
        init="pretrained", name_or_path=str(tmp_path / "base"), lora_rank=4, quantization="4bit"
    )
    with pytest.raises(ModelError, match="tokenizer has 130 tokens .* embeds 128"):
        build_model(settings, "causal_lm", 130, 16, 0, 0, [], "cpu")
    plain = replace(settings, quantization="none")
    grown = build_model(plain, "causal_lm", 130, 16, 0, 0, [], "cpu")
    assert grown.get_input_embeddings().num_embeddings == 130

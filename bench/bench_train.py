"""How fast is our trainer? The same tiny GPT-2 on the same token data, in one process:

1. ours: `snaketune.train.trainer.train_model`, the code the rule runs (open the memory-mapped
   arrays,
   train, validate, keep the final state, save model, history and loss curve);
2. bare: a nanoGPT-style torch loop (random windows of the same memory-mapped token array,
   forward, backward, clip, fused AdamW with the same groups and schedule, save_pretrained): the
   limit for the steps themselves;
3. reference: `transformers.Trainer` with matching settings (batch, AdamW betas and weight
   decay, warmup + cosine, grad clipping, steps, fp32 on CPU), then save_model, over
   transformers' GPT2LMHeadModel with the same initial weights (ours and bare train the lean
   GPT that scratch GPT-2 is, snaketune.train.lean_gpt).

Prints per-step time (the steps alone) and whole-call time of each (the fastest of --repeats
runs, interleaved), the ratios against the bare loop, our step against the bare step run in
alternating chunks in one process (the steadiest figure on a shared machine), where our fixed
cost (everything in the call that is not a step) goes, and the cost of starting a job's process
(imports), which the rule pays once per job.

Run: .venv/bin/python bench/bench_train.py [--steps 200] [--batch-size 16] [--block-size 128]
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def prepare_data(root: Path, block: int):
    from snaketune import local

    return local.prepare_data(local.demo_config("causal_lm", block), local.DEMO_EXPERIMENT, root)


def model_settings():
    from snaketune.train.settings import ModelSettings

    return ModelSettings(n_layer=2, n_embd=128, n_head=4, dropout=0.1, attention="sdpa")


def train_settings(args):
    from snaketune.train.settings import TrainSettings

    return TrainSettings(
        max_steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        min_lr_ratio=0.0,
        warmup_steps=args.warmup,
        eval_every=args.steps,
        checkpoint_every=args.steps * 10,
        weight_decay=0.01,
        seed=1,
    )


def tokenized(data):
    from snaketune.tokenize.shards import TokenizedData

    return TokenizedData.read(data.tokenize_manifest, data.shards)


def new_model(data, args):
    from snaketune.train.models import build_model

    info = tokenized(data)
    torch.manual_seed(1)
    return build_model(
        model_settings(),
        "causal_lm",
        info.vocab_size,
        args.block_size,
        info.pad_token_id,
        info.eos_token_id,
        [],
    )


def as_transformers(model):
    """GPT2LMHeadModel with the weights of the lean GPT that build_model made: what a user of
    transformers.Trainer trains."""
    from transformers import GPT2LMHeadModel

    from snaketune.train.lean_gpt import to_hf_state

    hf = GPT2LMHeadModel(model.config)
    hf.load_state_dict(to_hf_state(model.state_dict(), model.config.vocab_size))
    return hf


class Phases:
    """Seconds spent in chosen functions of snaketune.train.trainer during one call, by name."""

    WATCHED = {
        "steps": "one_step",
        "set-up (model, data digest)": "prepare_run",
        "resume check": "resume_run",
        "validation": "validate",
        "final state (checkpoint)": "checkpoint",
        "model, history, loss curve": "save_final",
    }

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def watching(self, module):
        originals = {name: getattr(module, name) for name in self.WATCHED.values()}
        for label, name in self.WATCHED.items():
            setattr(module, name, self._timed(label, originals[name]))
        try:
            yield self
        finally:
            for name, function in originals.items():
                setattr(module, name, function)

    def _timed(self, label, function):
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - started

        return timed


def run_ours(data, out: Path, args) -> dict:
    from snaketune.train import trainer as train
    from snaketune.train.settings import TrainJob

    job = TrainJob(task="causal_lm", model=model_settings(), train=train_settings(args))
    with Phases().watching(train) as phases:
        started = time.perf_counter()
        history = train.train_model(data.train_paths(out), job)
        seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "steps_s": phases.seconds["steps"],
        "losses": [r["loss"] for r in history],
        "phases": dict(phases.seconds),
    }


def bare_stepper(data, args):
    """One step of the bare loop per call: random windows of the memory-mapped token array,
    forward, backward, clip, fused AdamW with the same groups and schedule."""
    from snaketune.names import TRAIN
    from snaketune.train.batches import TokenRows
    from snaketune.train.trainer import learning_rate, make_optimizer

    settings = train_settings(args)
    stream = TokenRows.open(tokenized(data), TRAIN).stream()  # the same memory-mapped array
    model = new_model(data, args).train()
    optimizer = make_optimizer(model, settings)
    rng = np.random.default_rng(1)

    def step(number: int) -> float:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(number, settings)
        begins = rng.integers(0, len(stream) - args.block_size, args.batch_size)
        ids = np.stack([stream[b : b + args.block_size] for b in begins]).astype(np.int64)
        ids = torch.from_numpy(ids)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return model, step


def run_bare(data, out: Path, args) -> dict:
    started = time.perf_counter()
    model, step = bare_stepper(data, args)
    steps_started = time.perf_counter()
    losses = [step(number) for number in range(args.steps)]
    steps_s = time.perf_counter() - steps_started
    model.save_pretrained(out / "model")
    return {"seconds": time.perf_counter() - started, "steps_s": steps_s, "losses": losses}


def interleaved(data, root: Path, args, chunk: int = 10, rounds: int = 8) -> tuple[float, float]:
    """Median ms per step of our step and the bare one, run in alternating chunks in one
    process: a slow spell of a shared machine then slows both alike."""
    from snaketune.train.distributed import World
    from snaketune.train.settings import TrainJob
    from snaketune.train.trainer import one_step, prepare_run

    job = TrainJob(task="causal_lm", model=model_settings(), train=train_settings(args))
    run = prepare_run(tokenized(data), root / "interleaved-state", job, World())
    plan = [[0, args.steps, None]]
    _, bare_step = bare_stepper(data, args)
    ours_s, bare_s = [], []
    for number in range(rounds * chunk):
        if number % chunk == 0:
            ours_s.append(0.0)
            bare_s.append(0.0)
        started = time.perf_counter()
        one_step(run, number, plan)
        ours_s[-1] += time.perf_counter() - started
        started = time.perf_counter()
        bare_step(number)
        bare_s[-1] += time.perf_counter() - started
    return 1000 * float(np.median(ours_s)) / chunk, 1000 * float(np.median(bare_s)) / chunk


def run_reference(data, out: Path, args) -> dict:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from snaketune.names import TRAIN
    from snaketune.train.batches import TokenRows

    losses: list[float] = []
    step_started: list[float] = []
    step_seconds: list[float] = []

    class Record(TrainerCallback):
        def on_step_begin(self, *_, **__):
            step_started.append(time.perf_counter())

        def on_step_end(self, *_, **__):
            step_seconds.append(time.perf_counter() - step_started[-1])

        def on_log(self, _args, _state, _control, logs=None, **_):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    class Rows(torch.utils.data.Dataset):
        def __init__(self, rows: TokenRows):
            self.rows = rows

        def __len__(self) -> int:
            return len(self.rows)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            batch = self.rows.batch(np.array([i]))
            return {"input_ids": batch["input_ids"][0], "labels": batch["labels"][0]}

    started = time.perf_counter()
    rows = TokenRows.open(tokenized(data), TRAIN).with_targets()
    model = as_transformers(new_model(data, args))
    arguments = TrainingArguments(
        output_dir=str(out),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=args.warmup,
        weight_decay=0.01,
        adam_beta1=0.9,
        adam_beta2=0.95,
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        seed=1,
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=arguments, train_dataset=Rows(rows), callbacks=[Record()])
    trainer.train()
    trainer.save_model(str(out / "model"))
    return {
        "seconds": time.perf_counter() - started,
        "steps_s": sum(step_seconds),
        "losses": losses,
    }


def import_seconds() -> float:
    """A fresh interpreter importing what the train job imports, as each job's process does."""
    code = "import time; t = time.perf_counter(); "
    code += "import snaketune.train.trainer, transformers.models.gpt2;"
    code += "print(time.perf_counter() - t)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each; the fastest counts")
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = prepare_data(root / "data", args.block_size)
        warm_up = argparse.Namespace(**{**vars(args), "steps": 5})
        run_bare(data, root / "warm-up", warm_up)  # the process's first steps allocate
        runs: dict[str, list[dict]] = defaultdict(list)
        for repeat in range(args.repeats):  # interleaved, so a slow spell hits all three
            for name, run in (("bare", run_bare), ("ours", run_ours), ("ref", run_reference)):
                runs[name].append(run(data, root / f"{name}-{repeat}", args))
        bare, ours, reference = (min(runs[n], key=lambda r: r["seconds"]) for n in runs)
        ours_ms, bare_ms = interleaved(data, root, args)
    imports = import_seconds()

    print(
        f"tiny GPT-2 (2 x 128, dropout 0.1), {args.steps} steps of {args.batch_size} x "
        f"{args.block_size} tokens, fp32 CPU, {torch.get_num_threads()} threads, fastest of "
        f"{args.repeats}"
    )
    print(
        f"{'trainer':<26}{'ms/step':>9}{'step speed':>12}{'call s':>8}{'call speed':>12}"
        f"{'final loss':>12}"
    )
    for label, result in (
        ("bare torch loop", bare),
        ("ours: train_model", ours),
        ("transformers.Trainer", reference),
    ):
        print(
            f"{label:<26}{1000 * result['steps_s'] / args.steps:>9.1f}"
            f"{bare['steps_s'] / result['steps_s']:>11.2f}x{result['seconds']:>8.1f}"
            f"{bare['seconds'] / result['seconds']:>11.2f}x"
            f"{float(np.mean(result['losses'][-20:])):>12.4f}"
        )
    print("speeds are relative to the bare loop (1.00x = as fast as it); final loss: last 20 steps")
    print(
        f"steps interleaved (ours, bare, ours, ... in one process): ours {ours_ms:.1f} ms, bare "
        f"{bare_ms:.1f} ms a step: {bare_ms / ours_ms:.2f}x the bare loop's speed"
    )
    fixed = ours["seconds"] - ours["steps_s"]
    print(f"\nour fixed cost in the call: {fixed:.2f} s")
    for label, seconds in ours["phases"].items():
        if label != "steps":
            print(f"  {label:<32}{seconds:>6.2f} s")
    other = fixed - sum(s for k, s in ours["phases"].items() if k != "steps")
    print(f"  {'the rest (manifest, loop)':<32}{other:>6.2f} s")
    print(
        f"a job's process start (import snaketune.train.trainer, torch, transformers): "
        f"{imports:.2f} s"
    )


if __name__ == "__main__":
    main()

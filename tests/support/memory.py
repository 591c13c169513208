"""The peak memory of training steps, measured in a fresh process: `python -m
tests.support.memory <json>` builds a model as the train stage does from a saved checkpoint,
takes a warm-up step (AdamW's moments exist after it), resets the kernel's peak resident
memory, takes two more steps and prints the peak above the memory before the model was built,
with the plan of snaketune.train.memory_plan for the same settings."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path


def measure(folder: str, model: dict, train: dict, context: int, vocab: int) -> dict:
    import torch

    from snaketune.evaluate.evaluation import CPU
    from snaketune.train import lm_loss, memory_plan
    from snaketune.train.models import apply_lora, build_model
    from snaketune.train.settings import ModelSettings, TrainSettings
    from snaketune.train.trainer import forward, make_optimizer
    from snaketune.train.trainer import resident_bytes as resident

    torch.set_num_threads(2)
    settings = ModelSettings(init="pretrained", name_or_path=folder, **model)
    train_settings = TrainSettings(**train)
    before = resident("VmRSS")
    built = build_model(settings, "causal_lm", vocab, context, 0, 0, [])
    if settings.gradient_checkpointing:
        built.activation_checkpointing_enable({"use_reentrant": False})
    built = apply_lora(built, settings, "causal_lm").train()
    step_model = lm_loss.with_chunked_loss(built)
    optimizer = make_optimizer(built, train_settings)
    ids = torch.randint(0, vocab, (train_settings.batch_size, context))

    def step() -> None:
        forward(step_model, {"input_ids": ids, "labels": ids}, CPU).loss.backward()
        torch.nn.utils.clip_grad_norm_(built.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()

    step()
    Path("/proc/self/clear_refs").write_text("5")  # the peak from here on
    step()
    step()
    shape = memory_plan.checkpoint_shape(Path(folder), asdict(settings))
    planned = memory_plan.plan(shape, asdict(settings), asdict(train_settings), context, False)
    trainable = sum(p.numel() for p in built.parameters() if p.requires_grad)
    return {
        "measured": resident("VmHWM") - before,
        "planned": planned.total,
        "describe": planned.describe(),
        "parameters": sum(p.numel() for p in built.parameters()),
        "trainable": trainable,
        "shape": asdict(shape),
    }


if __name__ == "__main__":
    print(json.dumps(measure(**json.loads(sys.argv[1]))))

"""Held-out evaluation: an experiment's `evaluate:` section and the evaluate rule's job."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from snaketune.settings import AUTO, ConfigView, SettingsError, check_task, setting
from snaketune.train.settings import COMPILE_MODES, TrainSettings, compile_mode

GREEDY, SAMPLE = DECODINGS = ("greedy", "sample")
"""evaluate.decoding: the most likely token each step, or top-k sampling at a temperature (the
settings of SAMPLE: snaketune.names.SAMPLING_KEYS)."""


@dataclass(frozen=True)
class EvalSettings:
    SECTION: ClassVar[str] = "Held-out evaluation."

    batch_size: int = setting(32, minimum=1, description="Rows per evaluation batch.")
    prompts: list[str] = setting(
        factory=list,
        description=(
            "causal_lm prompts whose continuations go to the samples table (samples.csv)."
        ),
    )
    max_new_tokens: int = setting(
        40,
        minimum=1,
        description=(
            "Tokens generated per prompt and per test answer (and per request to the registered "
            "model when served)."
        ),
    )
    decoding: str = setting(
        GREEDY,
        enum=DECODINGS,
        description=(
            "How every generation picks its tokens (the prompts', the test answers', the served "
            "model's): greedy takes the most likely token, sample draws among top_k at "
            "temperature, seeded."
        ),
    )
    temperature: float = setting(
        0.8, exclusiveMinimum=0, description="Sampling temperature (decoding sample)."
    )
    top_k: int = setting(
        20, minimum=1, description="Sample among the k most likely tokens (decoding sample)."
    )
    top_p: float = setting(
        1.0,
        exclusiveMinimum=0,
        maximum=1,
        description=(
            "Of those top_k, sample among the most likely whose probabilities add up to top_p "
            "(nucleus sampling); 1 keeps all top_k (decoding sample)."
        ),
    )
    seed: int = setting(1234, minimum=0, description="Seeds generation.")
    answer_examples: int = setting(
        200,
        minimum=0,
        description=(
            "Instruction data: test examples whose answers are generated and scored (exact "
            "match, F1, ROUGE-L, and the retrieval baseline's); 0 means all."
        ),
    )
    context_length: int = setting(
        0,
        minimum=0,
        description="causal_lm tokens per perplexity window; 0 means tokenize.block_size.",
    )
    stride: int = setting(
        0,
        minimum=0,
        description=(
            "causal_lm tokens between perplexity windows; 0 means context_length - 1 (windows "
            "share one token, so every token is predicted once). Smaller gives the "
            "sliding-window estimate: more context per token, more compute."
        ),
    )
    compile: bool | str = setting(
        AUTO,
        oneOf=[{"type": "boolean"}, {"enum": (AUTO, *COMPILE_MODES)}],
        description=(
            "Score with the model compiled (perplexity windows and answer NLLs, or a "
            "classifier's predictions) and, on CUDA, generate through a static cache that "
            "generate() compiles in the same mode: 'auto' does as train.compile says; true, "
            "false, or a torch.compile mode as train.compile takes."
        ),
    )

    def __post_init__(self) -> None:
        if not isinstance(self.compile, bool) and self.compile not in (AUTO, *COMPILE_MODES):
            raise SettingsError(
                [("compile", f"must be true, false, auto or one of {COMPILE_MODES}")]
            )


@dataclass(frozen=True)
class EvalJob:
    task: str
    evaluate: EvalSettings = field(default_factory=EvalSettings)
    device: str = "auto"
    """Where the model is evaluated: the train section's device and precision."""
    precision: str = "auto"
    compile: bool | str = False
    """evaluate.compile, 'auto' resolved to train.compile (snaketune.train.lm_loss.scoring)."""

    @property
    def compile_mode(self) -> str | None:
        return compile_mode(self.compile)

    def __post_init__(self) -> None:
        check_task(self.task)


def eval_job(view: ConfigView, experiment: str) -> EvalJob:
    evaluate = view.section(EvalSettings, experiment, "evaluate")
    train = view.section(TrainSettings, experiment, "train")
    return EvalJob(
        task=view.experiment(experiment)["task"],
        evaluate=evaluate,
        device=train.device,
        precision=train.precision,
        compile=train.compile if evaluate.compile == AUTO else evaluate.compile,
    )

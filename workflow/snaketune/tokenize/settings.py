"""The tokenize stage's settings (an experiment's `tokenize:`) and its rules' jobs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from snaketune.data.settings import dataset_of
from snaketune.settings import AUTO, ConfigView, check_task, raise_problems, setting
from snaketune.tasks import task_of

LM_PACKINGS = ("across_documents", "per_document", "documents_apart")


ACROSS_DOCUMENTS, PER_DOCUMENT, DOCUMENTS_APART = LM_PACKINGS


HF_ENCODER = "hf"
"""Hugging Face tokenizers, which reads every tokenizer.json."""


FAST_ENCODER = "gigatoken"
"""gigatoken, used when it gives the same ids (snaketune.tokenize.encoder)."""


ENCODERS = (AUTO, HF_ENCODER, FAST_ENCODER)


@dataclass(frozen=True)
class TokenizeSettings:
    SECTION: ClassVar[str] = "How documents become Parquet shards of token ids."

    block_size: int = setting(
        128,
        minimum=8,
        maximum=131072,
        description=(
            "causal_lm tokens per row and the context length (per_document rows may be shorter)."
        ),
    )
    max_length: int = setting(
        128, minimum=4, maximum=131072, description="sequence_classification truncation length."
    )
    shard_rows: int = setting(4096, minimum=1, description="Rows per Parquet shard.")
    read_batch_rows: int = setting(
        1024, minimum=1, description="Documents tokenized per batch (bounds memory)."
    )
    partitions: int | str = setting(
        AUTO,
        oneOf=[{"type": "integer", "minimum": 1, "maximum": 99999}, {"const": "auto"}],
        description=(
            "Tokenize jobs for the train split, each reading its own contiguous rows (val and "
            "test are one job each). 'auto' sizes every split at one job per 256 MiB of text. "
            "Raise it to spread a large corpus over more cores or cluster jobs; with packing "
            "across_documents each causal_lm partition drops its last partial block (fewer than "
            "block_size tokens)."
        ),
    )
    packing: str = setting(
        ACROSS_DOCUMENTS,
        enum=LM_PACKINGS,
        description=(
            "causal_lm rows. across_documents packs documents, joined with EOS, into full "
            "block_size rows (no padding; a row may hold the end of one document and the start "
            "of the next, which attends to it). per_document cuts each document into rows of at "
            "most block_size tokens, so a model never attends across documents; short rows are "
            "padded and masked in training batches, nothing is dropped, and the rows do not "
            "depend on the number of partitions. documents_apart (plain text only; instruction "
            "examples packed across_documents are always kept apart) makes the rows of "
            "across_documents, but each document attends only to itself: its position ids "
            "restart at the EOS before it, in training, validation and the evaluation's windows "
            "alike (a transformer; the LSTM cannot)."
        ),
    )
    encoder: str = setting(
        AUTO,
        enum=ENCODERS,
        description=(
            "What turns text into token ids. auto uses gigatoken (a much faster BPE encoder) "
            "when the plan step finds it gives exactly the ids of Hugging Face tokenizers on a "
            "sample of the train split (EOS and special tokens included), else tokenizers; the "
            "plan and the manifest say which ran and why. hf always uses tokenizers; gigatoken "
            "requires it and stops with the reason when it differs. The shards are the same "
            "whichever ran. causal_lm only: classification uses tokenizers."
        ),
    )

    def __post_init__(self) -> None:
        problems = []
        if self.encoder not in ENCODERS:
            problems.append(("encoder", f"encoder {self.encoder!r} is not one of {ENCODERS}"))
        if self.partitions != AUTO and not (
            isinstance(self.partitions, int) and self.partitions >= 1
        ):
            problems.append(
                ("partitions", f"must be {AUTO!r} or an integer >= 1, not {self.partitions!r}")
            )
        if self.packing not in LM_PACKINGS:
            problems.append(("packing", f"packing {self.packing!r} is not one of {LM_PACKINGS}"))
        raise_problems(problems)


@dataclass(frozen=True)
class TokenizeJob:
    """What the plan and the gather need: the task and the tokenize section."""

    task: str
    tokenize: TokenizeSettings = field(default_factory=TokenizeSettings)
    instruction: bool = False
    """Instruction data: rows of whole examples whose prompt tokens are no target (see
    snaketune.tokenize.packing)."""

    def __post_init__(self) -> None:
        check_task(self.task)

    @property
    def layout(self) -> str:
        """How the rows are made: the LM packing (of instruction examples, for instruction
        data), or one row per classification example."""
        if not task_of(self.task).predicts_tokens:
            return self.task
        return f"instruction_{self.tokenize.packing}" if self.instruction else self.tokenize.packing

    @property
    def packs_examples(self) -> bool:
        """Train rows may hold several instruction examples, which training keeps apart."""
        return (
            task_of(self.task).predicts_tokens
            and self.instruction
            and self.tokenize.packing == ACROSS_DOCUMENTS
        )

    @property
    def keeps_documents_apart(self) -> bool:
        """Plain-text rows packed across documents, each document attending only to itself
        (snaketune.train.batches.TokenRows.separator)."""
        return (
            task_of(self.task).predicts_tokens
            and not self.instruction
            and self.tokenize.packing == DOCUMENTS_APART
        )

    @property
    def keeps_packed_apart(self) -> bool:
        """A train row may hold several examples or documents, which training keeps apart."""
        return self.packs_examples or self.keeps_documents_apart


@dataclass(frozen=True)
class PartitionJob(TokenizeJob):
    """One partition job: the split and the partition (the job's wildcards)."""

    split: str = field(kw_only=True)
    part: int = field(kw_only=True)


def tokenize_job(view: ConfigView, experiment: str) -> TokenizeJob:
    tokenize = view.section(TokenizeSettings, experiment, "tokenize")
    task = view.experiment(experiment)["task"]
    instruction = task_of(task).predicts_tokens and dataset_of(view, experiment).is_instruction
    return TokenizeJob(task=task, tokenize=tokenize, instruction=instruction)


def partition_job(view: ConfigView, experiment: str, split: str, part: str) -> PartitionJob:
    job = tokenize_job(view, experiment)
    return PartitionJob(
        task=job.task,
        tokenize=job.tokenize,
        instruction=job.instruction,
        split=split,
        part=int(part),
    )

"""The tasks a model can learn, each an object that holds what differs with it across the
stages: which rows it learns from, the models and adapters it trains, the tokenize key that
bounds a row, the size of its head. The config names a task by its `name`; the stages ask the
task (`task_of(job.task)`) rather than compare names, so a new task is one more object here and
the code that is new for it.
"""

from __future__ import annotations

from dataclasses import dataclass

from snaketune.names import CAUSAL_LM, SAMPLING_KEYS, SEQUENCE_CLASSIFICATION, TASKS


@dataclass(frozen=True)
class Task:
    name: str
    predicts_tokens: bool
    """Each token of a row is the target of the one before (a causal LM): next-token loss,
    perplexity, generation, the chunked loss and the lean models. Else a row has one label (a
    classifier): accuracy, a confusion matrix, a new head over the base."""
    row_limit: str
    """The tokenize key that bounds a row (what the served model cuts its input to)."""
    auto_model: str
    """transformers' class that loads a pretrained base for it."""
    gpt2_model: str
    llama_model: str
    """transformers' classes of a scratch GPT-2 or Llama where the lean ones do not serve (LoRA
    adapters, a classifier's head)."""
    peft_task_type: str
    """peft's TaskType of its LoRA adapters."""
    intended_use: str
    """The model card's "Intended use" (snaketune.track.model_card)."""
    own_keys: tuple[str, ...]
    """The experiment keys only this task reads: given for another task, they are refused."""

    def head_size(self, vocab_size: int, num_labels: int) -> int:
        return vocab_size if self.predicts_tokens else num_labels


LANGUAGE_MODEL = Task(
    name=CAUSAL_LM,
    predicts_tokens=True,
    row_limit="block_size",
    auto_model="AutoModelForCausalLM",
    gpt2_model="GPT2LMHeadModel",
    llama_model="LlamaForCausalLM",
    peft_task_type="CAUSAL_LM",
    own_keys=(
        "tokenize.block_size",
        "tokenize.packing",
        "evaluate.answer_examples",
        "evaluate.context_length",
        "evaluate.decoding",
        "evaluate.max_new_tokens",
        "evaluate.prompts",
        "evaluate.stride",
        *(f"evaluate.{key}" for key in SAMPLING_KEYS),
    ),
    intended_use=(
        "Continues text in the style and domain of its training corpus (the sampled "
        "continuations in the evaluate run show what that looks like). It is a small model "
        "trained from this corpus alone: it does not know facts beyond it, states wrong things "
        "fluently, and repeats what the corpus says, its biases and personal data that "
        "cleaning did not catch included. Use it to compare runs of this pipeline, or as a "
        "draft generator whose output a person checks; not to answer users unchecked."
    ),
)
CLASSIFIER = Task(
    name=SEQUENCE_CLASSIFICATION,
    predicts_tokens=False,
    row_limit="max_length",
    auto_model="AutoModelForSequenceClassification",
    gpt2_model="GPT2ForSequenceClassification",
    llama_model="LlamaForSequenceClassification",
    peft_task_type="SEQ_CLS",
    own_keys=("tokenize.max_length",),
    intended_use=(
        "Assigns each text one of the labels above, as learned from the training split. Every "
        "input gets one of them, however far it is from the training data; its errors follow "
        "the confusion matrix of the evaluate run, and label noise in the data bounds what it "
        "can learn. Use it on texts like the training corpus, and check its accuracy on your own "
        "labelled sample before relying on it."
    ),
)
BY_NAME = {task.name: task for task in (LANGUAGE_MODEL, CLASSIFIER)}
assert tuple(BY_NAME) == TASKS  # the config's allowed values are these tasks' names


def task_of(name: str) -> Task:
    """The task the config names (checked before any job: the schema's enum is TASKS)."""
    return BY_NAME[name]


def intended_use(name: str) -> str:
    """The model card's "Intended use" of a task; a config that names none (a manifest read
    back from elsewhere) has none stated."""
    task = BY_NAME.get(name)
    return task.intended_use if task else "Not stated for this task."

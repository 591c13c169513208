"""Names the whole pipeline shares, spelled here once: the splits, the tasks, what results_dir
holds beside the experiments, and the rule every user-given name that becomes a folder, a link
or an MLflow name must follow.

The config schema spells some of them too (as allowed values and patterns, for the user); unit
tests keep the two in step.
"""

from __future__ import annotations

import re

SPLITS = ("train", "val", "test")
"""The splits, in the order every stage visits them."""
TRAIN, VAL, TEST = SPLITS

CAUSAL_LM = "causal_lm"
SEQUENCE_CLASSIFICATION = "sequence_classification"
TASKS = (CAUSAL_LM, SEQUENCE_CLASSIFICATION)

SAMPLING_KEYS = ("temperature", "top_k", "top_p")
"""The evaluate settings (and the served model's params) that apply to decoding 'sample' only;
a language model's own (snaketune.tasks)."""

INSTRUCTION_COLUMNS = ("prompt", "response")
"""Instruction data: the columns of each cleaned document's two parts (text is both)."""
PROMPT, RESPONSE = INSTRUCTION_COLUMNS

SHARED_FOLDER = "shared"
"""results/<SHARED_FOLDER>/<stage>/<key>/: the outputs of a shared stage (snaketune.sharing);
and results/<SHARED_FOLDER>/compile_cache, the compiled graphs every job shares
(snaketune.train.compile_cache)."""
RESULTS_LAYOUT = (
    "datasets",  # datasets/<dataset>/download
    SHARED_FOLDER,
    "sweeps",  # sweeps/<sweep>: a sweep's table and plot
    "mlartifacts",  # the default SQLite store's artifacts
    "mlflow.db",
    "mlflow.lock",
    "provenance.json",
)
"""What results_dir holds beside the experiments' folders: an experiment of one of these names
would write into the layout's own folders, and the links made from it would loop."""

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
"""A user's name for an experiment, a dataset or a sweep: each becomes a folder, a link and an
MLflow run name, tag value or filter literal. No '/', no quote, not '.' or '..'."""
MAX_NAME_LENGTH = 128


def name_problem(name: object, what: str) -> str | None:
    """Why `name` cannot name a `what` (experiment, dataset, sweep), or None."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        return (
            f"{name!r} is not a usable {what} name: it becomes a folder under results_dir and an "
            "MLflow name, so use letters, digits, '_', '.' and '-', starting with a letter or digit"
        )
    if len(name) > MAX_NAME_LENGTH:
        return (
            f"{name[:20]!r}... is too long for a {what} name ({MAX_NAME_LENGTH} characters at most)"
        )
    if what == "experiment" and name.lower() in RESULTS_LAYOUT:
        return (
            f"{name!r} is a name results_dir uses for itself ({', '.join(RESULTS_LAYOUT)}); "
            "give the experiment another name"
        )
    return None


def quote_problem(value: str, what: str) -> str | None:
    """An MLflow name that the pipeline looks up again (a registered model's, an experiment's)
    goes into a filter string's quoted literal, which holds no quote."""
    if any(quote in value for quote in "'\"`"):
        return (
            f"{value!r} has a quote (' \" `), which the {what} cannot hold: MLflow finds it by name"
        )
    return None

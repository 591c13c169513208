"""Errors whose message is meant for the user: the CLI prints them without a traceback.

A problem the user can fix (the data, the settings, the machine's network or files as
configured) is raised as a SnaketuneError subclass whose message says what was expected, what
was found and what to do. Anything else that escapes a stage is a bug: the CLI prints its
traceback and says so (snaketune.cli). Some classes keep ValueError or OSError as a second base
so that `except ValueError` / `except OSError` around library calls still catch them."""

from __future__ import annotations

import sys
from pathlib import Path


class SnaketuneError(Exception):
    """Base of every error that says what was expected, what was found and what to do."""


class ConfigError(SnaketuneError, ValueError):
    """The config (or a setting read from the environment) is invalid; the message lists every
    problem by key."""


class UsageError(SnaketuneError, ValueError):
    """A command line that cannot run as given: what was given and what is expected."""


class DownloadError(SnaketuneError):
    """A download that cannot succeed as configured."""


class CorpusError(SnaketuneError, ValueError):
    """The corpus cannot produce usable documents."""


class TokenizerError(SnaketuneError):
    """The tokenizer cannot be trained or loaded."""


class ModelError(SnaketuneError, OSError):
    """A pretrained model cannot be loaded as configured."""


class TrainingError(SnaketuneError):
    """Training cannot continue; the message names the step and the last checkpoint."""


class TrackingError(SnaketuneError):
    """MLflow cannot be reached or written; results on disk are unaffected."""


class OutputError(SnaketuneError, OSError):
    """An output cannot be written (full disk, file size limit, read-only or missing folder);
    nothing is left under its name."""


def is_out_of_memory(err: BaseException) -> bool:
    """Whether `err` says memory ran out: MemoryError (Python, numpy), torch's OutOfMemoryError
    (CUDA), or the RuntimeError torch raises on the CPU or MPS. Imports nothing: torch counts
    only when a stage has loaded it."""
    if isinstance(err, MemoryError):
        return True
    torch_oom = getattr(sys.modules.get("torch"), "OutOfMemoryError", None)
    if torch_oom is not None and isinstance(err, torch_oom):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(
        sign in text for sign in ("out of memory", "can't allocate memory")
    )


def hub_offline() -> bool:
    """Whether hub files resolve only from the local cache: huggingface_hub's own reading of
    HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE), the one that decided whether the Hub was asked."""
    from huggingface_hub import constants  # imported already by whatever loaded from the hub

    return constants.is_offline_mode()


def not_loadable(what: str, key: str, name_or_path: str, err: Exception) -> str:
    """Why a model or tokenizer named by config key `key` did not load, and how to provide it."""
    if "trust_remote_code" in str(err):
        section = key.split(".")[0]
        return (
            f"{what} {name_or_path!r} ships Python code that would run on load; snaketune runs "
            f"it only with {section}.trust_remote_code: true in the experiment. Read it first."
        )
    path = Path(name_or_path).expanduser()
    if name_or_path.startswith(("/", ".", "~")) or path.exists():
        found = "is not a saved one" if path.exists() else "does not exist"
        return (
            f"{key}: {what} directory {path} {found}; point {key} at a directory written by "
            f"save_pretrained. ({err})"
        )
    if hub_offline():
        return (
            f"{key}: {what} {name_or_path!r} is a hub id and this run is offline (HF_HUB_OFFLINE "
            "is set), so it can only come from the local Hugging Face cache, where it is not. "
            f"Fetch it where there is network (hf download {name_or_path} --local-dir DIR) and "
            f"set {key} to that directory. ({err})"
        )
    return (
        f"{key}: could not fetch {what} {name_or_path!r} from the hub; check the id and the "
        f"network, or set {key} to a local directory written by save_pretrained. ({err})"
    )

"""Errors whose message is meant for the user: the CLI prints them without a traceback."""

from __future__ import annotations

from pathlib import Path


class SnaketuneError(Exception):
    """Base of every error that says what was expected, what was found and what to do."""


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

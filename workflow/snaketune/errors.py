"""Errors whose message is meant for the user: the CLI prints them without a traceback."""


class SnaketuneError(Exception):
    """Base of every error that says what was expected, what was found and what to do."""


class DownloadError(SnaketuneError):
    """A download that cannot succeed as configured."""


class CorpusError(SnaketuneError, ValueError):
    """The corpus cannot produce usable documents."""


class TokenizerError(SnaketuneError):
    """The tokenizer cannot be trained or loaded."""


class TrainingError(SnaketuneError):
    """Training cannot continue; the message names the step and the last checkpoint."""


class TrackingError(SnaketuneError):
    """MLflow cannot be reached or written; results on disk are unaffected."""

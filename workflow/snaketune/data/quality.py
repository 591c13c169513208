"""Cheap quality filters on cleaned documents, after the heuristics of large web-text pipelines
(Gopher's MassiveText rules): too few letters means tables, code dumps or mojibake; many repeated
lines means navigation menus and boilerplate; an odd mean word length means run-together or
shredded text. Each is off unless its threshold is set, and each names its own removal reason.
"""

from __future__ import annotations

import re
from typing import Protocol

_NOT_LETTER = re.compile(r"[\W\d_]+")
_SPACE = re.compile(r"\s+")


class QualityThresholds(Protocol):
    """The filters' settings, as CleanSettings holds them."""

    min_alpha_ratio: float
    max_repeated_line_fraction: float
    min_mean_word_length: float
    max_mean_word_length: float | None


def alpha_ratio(text: str) -> float:
    """Letters (any script) over non-space characters; 0 for a text of spaces only."""
    visible = len(_SPACE.sub("", text))
    return len(_NOT_LETTER.sub("", text)) / visible if visible else 0.0


def repeated_line_fraction(text: str) -> float:
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    return 1.0 - len(set(lines)) / len(lines) if lines else 0.0


def mean_word_length(text: str) -> float:
    words = text.split()
    return sum(map(len, words)) / len(words) if words else 0.0


def quality_problem(text: str, limits: QualityThresholds) -> str | None:
    """The first filter `text` fails, as its removal reason in the cleaning report, or None."""
    if limits.min_alpha_ratio > 0 and alpha_ratio(text) < limits.min_alpha_ratio:
        return "low_alpha_ratio"
    if (
        limits.max_repeated_line_fraction < 1
        and repeated_line_fraction(text) > limits.max_repeated_line_fraction
    ):
        return "repeated_lines"
    if limits.min_mean_word_length > 0 or limits.max_mean_word_length is not None:
        mean = mean_word_length(text)
        if mean < limits.min_mean_word_length:
            return "short_words"
        if limits.max_mean_word_length is not None and mean > limits.max_mean_word_length:
            return "long_words"
    return None

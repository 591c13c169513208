"""Names the whole pipeline shares, spelled here once: the splits and the tasks.

The config schema spells them too (as allowed values, for the user); a unit test keeps the two
in step.
"""

from __future__ import annotations

SPLITS = ("train", "val", "test")
"""The splits, in the order every stage visits them."""
TRAIN, VAL, TEST = SPLITS

CAUSAL_LM = "causal_lm"
SEQUENCE_CLASSIFICATION = "sequence_classification"
TASKS = (CAUSAL_LM, SEQUENCE_CLASSIFICATION)

INSTRUCTION_COLUMNS = ("prompt", "response")
"""Instruction data: the columns of each cleaned document's two parts (text is both)."""
PROMPT, RESPONSE = INSTRUCTION_COLUMNS

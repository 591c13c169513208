"""Texts made to measure: unrelated ones, and near-copies of them."""

from __future__ import annotations

import random

WORDS = (
    "order parcel refund invoice account password delivery courier warehouse label address "
    "payment card bank transfer receipt discount voucher coupon basket checkout shipping return "
    "exchange size colour model battery charger screen keyboard mouse laptop phone tablet cable "
    "adapter warranty repair engineer visit appointment morning evening weekend monday friday "
    "january march summer winter city street garden kitchen table chair lamp sofa shelf mirror"
).split()


def unrelated_texts(n: int, seed: int = 0) -> list[str]:
    """Texts of 60 random words: two of them share under a third of their 5-character shingles."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(60)) for _ in range(n)]


def near_copy(text: str) -> str:
    """The same text with two words changed (Jaccard about 0.9 on 5-character shingles)."""
    words = text.split()
    words[2], words[-3] = "zebra", "quokka"
    return " ".join(words)

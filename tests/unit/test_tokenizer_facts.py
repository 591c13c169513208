"""The plan job reads the trained BPE with `tokenizers` alone (no transformers import): the
same facts and the same encoder as through transformers; other tokenizers still go through
transformers."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest

from snaketune.tokenize.encoder import encoder_for, tokenizer_facts
from snaketune.tokenize.settings import TokenizeJob, TokenizeSettings
from tests.support.checkpoints import bert_checkpoint


def through_transformers(folder):
    """What the facts were when the plan job loaded every tokenizer with AutoTokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    return tokenizer.eos_token, tokenizer.eos_token_id, tokenizer.pad_token_id, len(tokenizer)


def facts_of(facts):
    return facts.eos_token, facts.eos_token_id, facts.pad_token_id, facts.vocab_size


@pytest.mark.parametrize("task", ["causal_lm", "sequence_classification"])
def test_the_trained_bpe_gives_what_transformers_gives(lm_data, task):
    folder = lm_data["tokenizer"]
    facts = tokenizer_facts(folder)
    assert facts_of(facts) == through_transformers(folder)
    texts = pd.read_parquet(lm_data["splits"]["test"])["text"].tolist()[:50]
    job = TokenizeJob(task=task, tokenize=TokenizeSettings(max_length=16))
    from transformers import AutoTokenizer

    from snaketune.tokenize import encoder as module

    reference = module.TokenizerFacts(
        AutoTokenizer.from_pretrained(folder).backend_tokenizer, *facts_of(facts)
    )
    ours = [e.ids for e in encoder_for(facts, job).encode_batch(texts)]
    theirs = [e.ids for e in encoder_for(reference, job).encode_batch(texts)]
    assert ours == theirs


def test_the_trained_bpe_is_read_without_importing_transformers(lm_data):
    code = (
        "import sys; from snaketune.tokenize.encoder import tokenizer_facts; "
        f"tokenizer_facts({str(lm_data['tokenizer'])!r}); "
        "print('transformers' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_another_tokenizer_goes_through_transformers(classification_data, tmp_path):
    folder = bert_checkpoint(classification_data["splits"]["train"], tmp_path / "bert")
    facts = tokenizer_facts(folder)
    assert facts_of(facts) == through_transformers(folder)
    encoded = facts.backend.encode("where is my order")
    assert encoded.tokens[0] == "[CLS]" and encoded.tokens[-1] == "[SEP]"

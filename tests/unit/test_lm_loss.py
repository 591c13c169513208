"""The loss and token scores taken a chunk of positions at a time (snaketune.train.lm_loss) are the
full logits' to fp32 rounding, with every gradient, for the families training meets."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from snaketune.train import lm_loss
from snaketune.train.batches import IGNORED_LABEL
from snaketune.train.lean_gpt import LeanGPT
from tests.support.families import tiny_causal_lm

VOCAB = 300


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 7 positions: every batch below spans several, with a ragged last one."""
    monkeypatch.setattr(lm_loss, "LOGITS_CHUNK_BYTES", 4 * VOCAB * 7)


def ids_and_labels(rows: int = 3, length: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (rows, length), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, 12:] = IGNORED_LABEL  # a padded row's tail
    labels[2, :6] = IGNORED_LABEL  # an instruction row's prompt
    return ids, labels


def test_the_linear_cross_entropy_and_its_gradients_are_the_full_ones(small_chunks):
    """Against F.cross_entropy over the whole logits, with a biased head (Phi has one)."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(41, 16, generator=generator, requires_grad=True)
    weight = torch.randn(VOCAB + 20, 16, generator=generator, requires_grad=True)  # padded rows
    bias = torch.randn(VOCAB + 20, generator=generator, requires_grad=True)
    targets = torch.randint(0, VOCAB, (41,), generator=generator)
    targets[::5] = IGNORED_LABEL

    ours = lm_loss.LinearCrossEntropy.apply(hidden, weight, bias, targets, VOCAB)
    ours.backward()
    got = [hidden.grad.clone(), weight.grad.clone(), bias.grad.clone()]
    for tensor in (hidden, weight, bias):
        tensor.grad = None
    logits = F.linear(hidden, weight[:VOCAB], bias[:VOCAB])
    full = F.cross_entropy(logits, targets, ignore_index=IGNORED_LABEL, reduction="sum")
    full.backward()

    assert float(ours.detach()) == pytest.approx(float(full.detach()), rel=1e-6)
    for mine, theirs in zip(got, (hidden.grad, weight.grad, bias.grad), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
    assert not got[1][VOCAB:].any() and not got[2][VOCAB:].any()


@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt_neox", "lean"])
def test_a_wrapped_model_trains_with_its_own_loss_and_gradients(family, small_chunks):
    torch.manual_seed(0)
    model = LeanGPT(tiny_causal_lm("gpt2", VOCAB).config) if family == "lean" else None
    model = model or tiny_causal_lm(family, VOCAB)
    ids, labels = ids_and_labels()
    wrapped = lm_loss.with_chunked_loss(model)
    assert (wrapped is model) == (family == "lean")
    assert lm_loss.loss_path(model) == lm_loss.CHUNKED

    ours = wrapped(input_ids=ids, labels=labels)
    ours.loss.backward()
    assert ours.logits is None  # the whole logits are never built
    got = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    logits = model(input_ids=ids).logits.float()
    full = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORED_LABEL,
    )
    full.backward()

    assert float(ours.loss.detach()) == pytest.approx(float(full.detach()), rel=1e-6)
    for name, param in model.named_parameters():
        torch.testing.assert_close(got[name], param.grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("family", ["gpt2", "llama", "lean"])
def test_token_scores_are_those_of_the_whole_logits(family, small_chunks):
    torch.manual_seed(0)
    model = LeanGPT(tiny_causal_lm("gpt2", VOCAB).config) if family == "lean" else None
    model = (model or tiny_causal_lm(family, VOCAB)).eval()
    ids, _ = ids_and_labels()
    nll, top, expected, logits, targets = scores_and_full_logits(model, ids)
    torch.testing.assert_close(nll, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(top, logits.argmax(-1) == targets)


def scores_and_full_logits(model, ids: torch.Tensor):
    """target_scores of the next tokens, and what the whole logits give: (nll, top, the full
    NLL, the logits, the targets)."""
    targets = lm_loss.next_token_targets(ids).clamp(min=0)
    nll, top = lm_loss.target_scores(model, input_ids=ids, targets=targets)
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    expected = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    return nll, top, expected, logits, targets


def test_a_family_whose_logits_are_not_its_heads_keeps_its_own_forward():
    """Gemma 2 soft-caps its logits: head(hidden) is not what it predicts, so neither training
    nor evaluation takes the chunked path, and the manifest says so."""
    torch.manual_seed(0)
    model = tiny_causal_lm("gemma2", VOCAB).eval()
    ids, _ = ids_and_labels()

    assert lm_loss.head_of(model) is None and lm_loss.with_chunked_loss(model) is model
    assert lm_loss.loss_path(model) == lm_loss.OWN_FORWARD
    nll, _, expected, _, _ = scores_and_full_logits(model, ids)
    torch.testing.assert_close(nll, expected, rtol=1e-6, atol=1e-6)


def test_a_model_that_changes_its_logits_unannounced_is_found_by_its_forward_pass():
    """No config key says so, yet its logits are not head(hidden): the one checking forward
    pass sees it."""
    from transformers import GPT2LMHeadModel

    class ScaledGPT2(GPT2LMHeadModel):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2
            return out

    torch.manual_seed(0)
    model = ScaledGPT2(tiny_causal_lm("gpt2", VOCAB).config)
    assert lm_loss.transformers_head(model) is not None and not lm_loss.reshapes_logits(model)
    assert lm_loss.head_of(model) is None and lm_loss.with_chunked_loss(model) is model


def test_under_bf16_autocast_the_loss_is_the_model_s_own_to_bf16_rounding():
    """The head is cast once to autocast's dtype and the chunks run in it, as autocast would
    run the model's own head: the same loss to bf16's rounding, and gradients for every weight."""
    torch.manual_seed(0)
    model = tiny_causal_lm("llama", VOCAB)
    ids, labels = ids_and_labels()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = lm_loss.with_chunked_loss(model)(input_ids=ids, labels=labels).loss
        theirs = model(input_ids=ids, labels=labels).loss
    ours.backward()
    assert float(ours.detach()) == pytest.approx(float(theirs.detach()), rel=1e-2)
    assert all(p.grad is not None and p.grad.dtype == p.dtype for p in model.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("family", ["lean", "llama"])
def test_compiled_scoring_gives_the_eager_scores(family):
    """train.compile's evaluation: score_lm's windows with the final hidden states compiled
    (the lean GPT's own, a transformers model's body), equal to the eager scores."""
    import numpy as np

    from snaketune.evaluate.evaluation import CPU
    from snaketune.evaluate.perplexity import score_lm

    torch.manual_seed(0)
    model = tiny_causal_lm("gpt2" if family == "lean" else family, VOCAB).eval()
    if family == "lean":
        model = LeanGPT(model.config).eval()
    stream = np.random.default_rng(0).integers(0, VOCAB, 94)  # three windows of 32
    lengths = np.ones(VOCAB, dtype=np.int64)
    eager = score_lm(model, stream, 32, 31, 2, lengths, CPU)
    compiled = lm_loss.scoring(model, "default")
    assert lm_loss.head_of(compiled) is not None  # the chunked scores, on compiled states
    scored = score_lm(compiled, stream, 32, 31, 2, lengths, CPU)
    assert scored["nll_sum"] == pytest.approx(eager["nll_sum"], rel=1e-5)
    assert scored["next_token_accuracy"] == eager["next_token_accuracy"]

"""What the served model takes from a request (snaketune.track.serving): texts, generation params
checked against the evaluation's decoding, and params no model declares refused rather than
dropped. The same requests over HTTP are in tests/integration/test_serving.py."""

from __future__ import annotations

import mlflow.pyfunc
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

from snaketune.evaluate.settings import GREEDY, SAMPLE, EvalSettings
from snaketune.names import CAUSAL_LM, SEQUENCE_CLASSIFICATION
from snaketune.track.serving import (
    refuse_unknown_params,
    request_settings,
    request_texts,
    signature,
)

EVALUATION = EvalSettings(max_new_tokens=6)
LIMIT = 31


def refusal(call, *args) -> str:
    with pytest.raises(MlflowException) as caught:
        call(*args)
    assert caught.value.get_http_status_code() == 400
    return caught.value.message


def test_texts_are_a_column_of_non_blank_strings():
    assert request_texts(pd.DataFrame({0: ["a", "b"]})) == ["a", "b"]
    assert request_texts(pd.DataFrame({"text": ["a"]})) == ["a"]  # dataframe_split's column
    assert request_texts(["a"]) == ["a"]


@pytest.mark.parametrize(
    ("model_input", "found"),
    [
        (pd.DataFrame({0: [5]}), "found int 5 as input 1"),
        (pd.DataFrame({0: ["a", None]}), "found null as input 2"),
        (pd.DataFrame({0: [None]}), "found null as input 1"),
        (pd.DataFrame({0: [["a"]]}), "found list ['a'] as input 1"),
        (pd.DataFrame({"text": ["a"], "label": ["b"]}), "found columns ['text', 'label']"),
        (
            pd.DataFrame({"role": ["user"]}),
            "found a conversation of role/content turns, which is not taken",
        ),
    ],
)
def test_anything_but_texts_is_refused_naming_what_is_expected(model_input, found):
    message = refusal(request_texts, model_input)
    assert message.startswith('expected texts: {"inputs": ["a text", ...]}') and found in message


@pytest.mark.parametrize("blank", ["", "  \n\t"])
def test_an_empty_text_is_refused(blank):
    assert "input 2 is empty" in refusal(request_texts, pd.DataFrame({0: ["a", blank]}))


def test_without_params_a_request_is_decoded_as_evaluation_decodes():
    assert request_settings(None, EVALUATION, LIMIT) == EVALUATION
    unset = dict.fromkeys(
        ["max_new_tokens", "decoding", "do_sample", "temperature", "top_k", "top_p"]
    )
    assert request_settings(unset, EVALUATION, LIMIT) == EVALUATION  # MLflow's None defaults


def test_params_are_honoured():
    settings = request_settings(
        {"max_new_tokens": 3, "decoding": SAMPLE, "temperature": 0.5, "top_k": 4, "top_p": 0.9},
        EVALUATION,
        LIMIT,
    )
    assert (settings.max_new_tokens, settings.decoding) == (3, SAMPLE)
    assert (settings.temperature, settings.top_k, settings.top_p) == (0.5, 4, 0.9)
    assert settings.seed == EVALUATION.seed
    assert request_settings({"do_sample": True}, EVALUATION, LIMIT).decoding == SAMPLE
    sampling = EvalSettings(decoding=SAMPLE)
    assert request_settings({"do_sample": False}, sampling, LIMIT).decoding == GREEDY
    assert request_settings({"temperature": 2.0}, sampling, LIMIT).temperature == 2.0


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"temperature": 0.7}, "temperature apply to sampling; this request decodes greedily"),
        ({"decoding": GREEDY, "top_k": 5}, "top_k apply to sampling"),
        ({"do_sample": False, "temperature": 0.7, "top_k": 5}, "temperature, top_k apply"),
        ({"decoding": "beam"}, "decoding must be one of ['greedy', 'sample']; found 'beam'"),
        ({"decoding": SAMPLE, "do_sample": False}, "decoding 'sample' and do_sample False"),
        ({"max_new_tokens": 0}, "max_new_tokens must be between 1 and 31; found 0"),
        ({"max_new_tokens": 32}, "max_new_tokens must be between 1 and 31; found 32"),
        ({"decoding": SAMPLE, "temperature": 0.0}, "temperature must be a number above 0"),
        ({"decoding": SAMPLE, "temperature": float("nan")}, "temperature must be a number"),
        ({"decoding": SAMPLE, "top_k": 0}, "top_k must be 1 or more; found 0"),
        ({"decoding": SAMPLE, "top_p": 0.0}, "top_p must be above 0 and at most 1; found 0.0"),
        ({"decoding": SAMPLE, "top_p": 1.5}, "top_p must be above 0 and at most 1; found 1.5"),
        ({"top_p": 0.5}, "top_p apply to sampling"),
    ],
)
def test_params_out_of_bounds_or_against_the_decoding_are_refused(params, expected):
    assert expected in refusal(request_settings, params, EVALUATION, LIMIT)


def test_the_signature_declares_a_causal_lm_s_params_and_none_for_a_classifier():
    params = signature(CAUSAL_LM).params
    assert {spec.name: spec.default for spec in params.params} == dict.fromkeys(
        ["max_new_tokens", "decoding", "do_sample", "temperature", "top_k", "top_p"]
    )
    assert signature(SEQUENCE_CLASSIFICATION).params is None


def test_a_param_the_signature_does_not_declare_is_refused_not_dropped(monkeypatch):
    """MLflow would drop it with a log warning; the served model refuses it by name."""
    monkeypatch.setattr(
        mlflow.pyfunc, "_enforce_params_schema", mlflow.pyfunc._enforce_params_schema
    )
    refuse_unknown_params()
    refuse_unknown_params()  # a second model loaded in the same process wraps nothing again
    enforce = mlflow.pyfunc._enforce_params_schema
    schema = signature(CAUSAL_LM).params
    message = refusal(enforce, {"max_tokens": 5}, schema)
    assert message.startswith("unknown params ['max_tokens'] for this model: its params are ")
    assert "max_new_tokens, decoding, do_sample, temperature, top_k, top_p" in message
    assert "it takes no params" in refusal(enforce, {"max_new_tokens": 5}, None)
    assert enforce({"max_new_tokens": 5}, schema)["max_new_tokens"] == 5
    assert enforce(None, None) is None

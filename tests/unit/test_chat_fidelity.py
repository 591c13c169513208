"""Chat template fidelity: an instruction example that a pretrained tokenizer's chat template
composes is trained on the prompt that serving builds for the same user text, and on the end of
the assistant's turn and EOS that generation stops at.

Each template's data goes through the real data stages (download, clean, split, tokenizer,
tokenize) with rows long enough to hold a whole example; the served model is ServedModel loaded
as MLflow loads it, with the prompt template the clean stage records (what the track job logs
the model with). Templates: the tests' simple one (the answer ends with a newline), one in the
style of ChatML (Qwen: `<|im_end|>` ends a turn, EOS is another token, a default system turn),
and one in the style of Llama 3 (`<|eot_id|>` ends a turn; the template writes BOS, and the
tokenizer adds BOS too where asked to)."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from snaketune.data.reading import read_records
from snaketune.data.settings import ReadSettings
from snaketune.evaluate.generation import end_of_turn_id, prompt_ids, stop_ids
from snaketune.evaluate.settings import EvalSettings
from snaketune.names import CAUSAL_LM
from snaketune.tokenize.shards import read_shards
from snaketune.track.serving import MODEL_ARTIFACT, SERVING_CONFIG, ServedModel, serving_config
from tests.support.checkpoints import CHAT_TEMPLATE
from tests.support.stage_data import prepare_stage_data


@dataclass(frozen=True)
class Template:
    text: str
    specials: dict
    """The special tokens the tokenizer is given (add_special_tokens)."""
    answer_end: str
    """What the template writes after the assistant's answer."""
    end_of_turn: str | None
    """The special token that ends the assistant's turn, where it has one."""
    run_on: str
    """A user turn that a model goes on with when nothing stops it after its own turn."""
    adds_bos: bool = False
    """The tokenizer's post-processor puts BOS first (as Llama's does)."""


CHATML = (
    "{% if messages[0]['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}"
    "<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
TEMPLATES = {
    "simple": Template(CHAT_TEMPLATE, {}, "\n", None, "<|user|>And one more thing"),
    "chatml": Template(
        CHATML,
        {"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]},
        "<|im_end|>\n",
        "<|im_end|>",
        "<|im_start|>user\nAnd one more thing",
    ),
    "llama3": Template(
        LLAMA3,
        {
            "bos_token": "<|begin_of_text|>",
            "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        },
        "<|eot_id|>",
        "<|eot_id|>",
        "<|start_header_id|>user<|end_header_id|>\n\nAnd one more thing",
        adds_bos=True,
    ),
}


def chat_tokenizer(base: Path, template: Template, out: Path) -> Path:
    """lm_data's byte-level BPE as a pretrained chat tokenizer: the template, its special
    tokens added, EOS its own <|endoftext|>."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.add_special_tokens(template.specials)
    tokenizer.chat_template = template.text
    if template.adds_bos:
        bos = (tokenizer.bos_token, tokenizer.bos_token_id)
        tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos[0]} $A", special_tokens=[bos]
        )
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module", params=list(TEMPLATES))
def chat_data(request, lm_data, tmp_path_factory) -> dict:
    """The demo corpus as instruction data composed by the template (rows of 512 tokens: every
    example whole, ending with EOS)."""
    template = TEMPLATES[request.param]
    root = tmp_path_factory.mktemp(f"chat-{request.param}")
    folder = chat_tokenizer(lm_data["tokenizer"], template, root / "chat-tokenizer")
    experiment = {
        "text_template": None,
        "tokenizer": {"kind": "pretrained", "name_or_path": str(folder)},
    }
    data = prepare_stage_data(
        root / "data", CAUSAL_LM, 512, instruction=True, experiment=experiment
    )
    return {**data, "template": template}


@dataclass(frozen=True)
class Example:
    """One test example as training reads it, with the record it came from."""

    prompt: str
    response: str
    question: str
    answer: str
    """The raw record's fields: what a user asks, and the answer alone."""
    ids: list[int]
    targets: list[bool]
    row: int


@pytest.fixture(scope="module")
def example(chat_data) -> Example:
    """The first test example whose raw record's question and answer it holds verbatim (the
    test split is one example per row, in the split's order)."""
    test = pd.read_parquet(chat_data["splits"]["test"])
    shards = read_shards(chat_data["shards"] / "test").to_pandas()
    raw_files = chat_data["manifests"]["download"].parent / "files"
    (raw_file,) = raw_files.iterdir()
    raw, _ = read_records(raw_file, ReadSettings(format="jsonl"))
    questions: dict[str, set[str]] = {}
    for question, answer in zip(raw["question"], raw["answer"], strict=True):
        questions.setdefault(answer, set()).add(question)
    end = chat_data["template"].answer_end
    for row, record in enumerate(test.itertuples()):
        answer = record.response.removesuffix(end)
        asked = [q for q in questions.get(answer, ()) if q in record.prompt]
        if asked:
            ids, targets = shards["input_ids"][row], shards["targets"][row]
            return Example(
                record.prompt,
                record.response,
                max(asked, key=len),
                answer,
                [int(i) for i in ids],
                [bool(t) for t in targets],
                row,
            )
    raise AssertionError("no test example holds its raw record verbatim")


def scripted_lm(folder: Path, tokenizer_dir: Path, start: int, script: list[int], info: dict):
    """A GPT-2 whose next token depends on the position alone: from position `start` on it
    writes `script`, whatever came before (embeddings of tokens and the blocks zero, one-hot
    positions, an output layer that maps each position to its token). Saved with the tokenizer
    as the train stage saves a model."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    width = -(-(start + len(script)) // 64) * 64
    config = GPT2Config(
        vocab_size=info["vocab_size"],
        n_positions=width,
        n_embd=width,
        n_layer=1,
        n_head=1,
        tie_word_embeddings=False,
        bos_token_id=info["eos_token_id"],
        eos_token_id=info["eos_token_id"],
        pad_token_id=info["pad_token_id"],
    )
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
        model.transformer.wpe.weight.copy_(torch.eye(width))
        model.transformer.ln_f.weight.fill_(1.0)
        wanted = torch.zeros(width, info["vocab_size"])
        for offset, token in enumerate(script):
            wanted[start - 1 + offset, token] = 10.0
        # LayerNorm maps position p's one-hot to a * (one-hot(p) - mean): a logit per position
        # that sums to zero over the positions is reached exactly, and keeps its argmax.
        normed = model.transformer.ln_f(torch.eye(width))
        scale = float(normed[0, 0] - normed[0, 1])
        model.lm_head.weight.copy_((wanted - wanted.mean(0)).T / scale)
    model.save_pretrained(folder)
    for item in Path(tokenizer_dir).iterdir():
        shutil.copy2(item, folder / item.name)
    return folder


def served_model(chat_data, example: Example, out: Path) -> ServedModel:
    """ServedModel over a scripted model that writes the example's answer and end of turn,
    then (where the template ends a turn with a token of its own, before the EOS it was
    trained to write next) a user turn of its own, as a pretrained chat model goes on; loaded
    with the prompt template the clean stage records, as the track job logs it."""
    from mlflow.pyfunc import PythonModelContext
    from transformers import AutoTokenizer

    template = chat_data["template"]
    info = json.loads(chat_data["tokenize_manifest"].read_text())
    tokenizer = AutoTokenizer.from_pretrained(chat_data["tokenizer"])
    start = example.targets.index(True)
    targets = example.ids[start:]
    run_on = tokenizer.encode(template.run_on, add_special_tokens=False)
    script = (targets[:-1] if template.end_of_turn else targets) + run_on
    model_dir = scripted_lm(out / "model", chat_data["tokenizer"], start, script, info)

    clean = json.loads(chat_data["manifests"]["clean"].read_text())
    prompt_template = clean.get("instruction", {}).get("serving_template")
    config = serving_config(CAUSAL_LM, {"max_new_tokens": len(script)}, prompt_template, 0)
    served = ServedModel()
    served.load_context(
        PythonModelContext({MODEL_ARTIFACT: str(model_dir)}, {SERVING_CONFIG: config})
    )
    return served


@pytest.fixture(scope="module")
def served(chat_data, example, tmp_path_factory) -> ServedModel:
    return served_model(chat_data, example, tmp_path_factory.mktemp("served"))


# --- the prompt ---------------------------------------------------------------------------------


def test_the_served_prompt_is_the_trained_prompt_token_for_token(chat_data, example, served):
    prompt_length = example.targets.index(True)
    assert example.targets == [False] * prompt_length + [True] * (len(example.ids) - prompt_length)

    (prompt,) = served.prompts([example.question])
    assert prompt == example.prompt
    ids, cut = prompt_ids(served.tokenizer, prompt, served.context, served.settings.max_new_tokens)
    assert cut == 0
    assert ids == example.ids[:prompt_length]
    # No token the template did not write (a second BOS, say): the ids are the text's own.
    assert served.tokenizer.decode(ids) == example.prompt
    if chat_data["template"].adds_bos:
        bos = served.tokenizer.bos_token_id
        assert served.tokenizer.encode("x")[0] == bos  # the tokenizer's own BOS, not written
        assert ids[0] == bos and ids.count(bos) == 1


def test_a_request_goes_into_the_template_as_cleaning_left_the_training_fields(example, served):
    """Cleaning strips every field an example is composed of; the whitespace around a
    request's text would be tokens no trained prompt has (a newline before the end of the
    user's turn, say)."""
    (prompt,) = served.prompts([f"  {example.question}\n"])
    assert prompt == example.prompt
    ids, _ = prompt_ids(served.tokenizer, prompt, served.context, served.settings.max_new_tokens)
    assert ids == example.ids[: example.targets.index(True)]


# --- the end of the answer ----------------------------------------------------------------------


def test_the_answer_is_trained_to_end_with_the_end_of_turn_and_eos(chat_data, example, served):
    template, tokenizer = chat_data["template"], served.tokenizer
    assert tokenizer.decode(example.ids) == example.prompt + example.response + tokenizer.eos_token
    assert example.response == example.answer + template.answer_end
    end = tokenizer.encode(template.answer_end, add_special_tokens=False)
    ending = [*end, tokenizer.eos_token_id]
    assert example.ids[-len(ending) :] == ending
    assert all(example.targets[-len(ending) :])
    if template.end_of_turn is None:
        assert end_of_turn_id(tokenizer) is None
        assert stop_ids(tokenizer) == [tokenizer.eos_token_id]
    else:
        turn_end = tokenizer.convert_tokens_to_ids(template.end_of_turn)
        assert end[0] == turn_end != tokenizer.eos_token_id
        assert end_of_turn_id(tokenizer) == turn_end
        assert stop_ids(tokenizer) == [tokenizer.eos_token_id, turn_end]


def test_the_served_answer_ends_where_the_trained_turn_ends(example, served):
    """The model writes the trained answer and end of turn, then runs on into a user turn; the
    served answer is the trained answer alone."""
    assert served.predict(None, [example.question]) == [example.answer]


def test_evaluation_scores_the_answer_without_the_template_s_end_of_turn(
    chat_data, example, served, tmp_path
):
    """Evaluation generates as serving does (stopping at the end of the turn, special tokens
    left out), and compares with the test example's response without the text of the
    template's tokens (answer<|im_end|> is scored as answer)."""
    from snaketune.evaluate.evaluation import CPU
    from snaketune.evaluate.qa import evaluate_answers

    test = pd.read_parquet(chat_data["splits"]["test"]).iloc[[example.row]]
    test.to_parquet(tmp_path / "test.parquet")
    settings = EvalSettings(max_new_tokens=served.settings.max_new_tokens, answer_examples=1)
    metrics, _, table = evaluate_answers(
        served.model,
        served.tokenizer,
        chat_data["splits"]["train"],
        tmp_path / "test.parquet",
        settings,
        served.context,
        CPU,
    )
    assert table["generated"].tolist() == [example.answer]
    assert table["reference"].tolist() == [example.answer]
    assert metrics["exact_match"] == 1.0
    # The retrieval baseline answers with a training response: scored without them too.
    added = [t.content for t in served.tokenizer.added_tokens_decoder.values()]
    assert not [t for t in added if t in table["retrieved"].iloc[0]]

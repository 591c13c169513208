"""Instruction data: prompt and response from the template, rows of whole examples for both
packings, and a loss (training's own) that only the response tokens contribute to, checked
against an independent encoding of the split's texts and an independent NLL."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from snaketune.config import cross_checks
from snaketune.data.settings import CleanSettings, ReadSettings, instruction_template
from snaketune.evaluate.evaluation import CPU
from snaketune.settings import SettingsError
from snaketune.tokenize.encoder import Encoded, instruction_examples
from snaketune.tokenize.packing import pack_examples, pack_whole_examples
from snaketune.tokenize.settings import TokenizeJob
from snaketune.tokenize.shards import INSTRUCTION_SCHEMA, ShardWriter, TokenizedData, read_shards
from snaketune.train.batches import IGNORED_LABEL
from snaketune.train.models import build_model
from snaketune.train.settings import ModelSettings
from snaketune.train.trainer import forward
from tests.support.checkpoints import CHAT_TEMPLATE
from tests.support.stage_data import rows_of
from tests.support.workflow import config_with, with_defaults

# --- the template -------------------------------------------------------------------------------


def test_the_response_placeholder_splits_the_template_and_takes_the_whitespace_before_it():
    template = instruction_template("Customer: {question}\nAgent: {answer}", None, "answer")
    assert template.prompt == "Customer: {question}\nAgent:"
    assert template.response == " {answer}"
    assert template.columns == ["question", "answer"]


def test_without_a_template_the_documented_default_uses_the_prompt_column():
    template = instruction_template(None, "q", "a")
    assert (template.prompt, template.response) == ("Question: {q}\nAnswer:", " {a}")


@pytest.mark.parametrize(
    ("text_template", "prompt_column", "says"),
    [
        ("Q: {question}", "question", "has no {answer}"),
        ("Q: {question} {answer} {answer}", None, "twice"),
        ("  {answer}", None, "nothing before"),
        (None, None, "needs a text_template"),
    ],
)
def test_templates_that_cannot_split_are_refused(text_template, prompt_column, says):
    with pytest.raises(SettingsError, match=says):
        instruction_template(text_template, prompt_column, "answer")


def test_the_config_check_names_the_experiments_template():
    config = config_with(experiments__0__text_template="Customer: {question}")
    problems = cross_checks(with_defaults(config))
    assert [p for p in problems if p.startswith("experiments[0].text_template:")], problems


def test_the_clean_stage_records_how_the_examples_were_composed(qa_data):
    manifest = json.loads(qa_data["manifests"]["clean"].read_text())
    instruction = manifest["instruction"]
    train = pd.read_parquet(qa_data["splits"]["train"])
    if instruction["format"] == "chat_template":
        assert instruction["serving_template"] == "<|user|>{prompt}\n<|assistant|>"
        assert train["prompt"].str.startswith("<|user|>").all()
        assert train["prompt"].str.endswith("\n<|assistant|>").all()
        assert train["response"].str.endswith("\n").all()
    else:
        assert instruction == {
            "format": "text_template",
            "serving_template": "Customer: {prompt}\nAgent:",
        }
        assert train["prompt"].str.startswith("Customer: ").all()
        assert train["response"].str.startswith(" ").all()


# --- examples and rows --------------------------------------------------------------------------

EOS = 9


def encoded(docs: list[list[int]]) -> Encoded:
    """Documents as an encoder returns them: each ending with EOS."""
    ids = [token for doc in docs for token in [*doc, EOS]]
    return Encoded(np.array(ids, np.int32), np.array([len(d) + 1 for d in docs], np.int64))


def test_an_example_is_its_prompt_without_eos_then_its_response_with_it():
    joined = instruction_examples(encoded([[1, 2], [], [3]]), encoded([[4], [5, 6], []]))
    assert joined.ids.tolist() == [1, 2, 4, EOS, 5, 6, EOS, 3, EOS]
    assert joined.lengths.tolist() == [4, 3, 2]
    assert joined.targets.tolist() == [0, 0, 1, 1, 1, 1, 1, 0, 1]


def packed(pack, batches: list[Encoded], block: int):
    class Rows(ShardWriter):
        def __init__(self):
            self.tables = []

        def write(self, table):
            self.tables.append(table)

    writer = Rows()
    counts = pack(((None, b) for b in batches), writer, block)
    rows = pd.concat([t.to_pandas() for t in writer.tables], ignore_index=True)
    return counts, [list(r) for r in rows["input_ids"]], [list(t) for t in rows["targets"]]


EXAMPLES = instruction_examples(
    encoded([[1, 2], [3], [4, 5, 6], [7]]), encoded([[11], [12, 13], [14, 15, 16, 17], [18]])
)
"""Lengths 4, 4, 8, 3."""


def batches_of(example: Encoded, sizes: list[int]) -> list[Encoded]:
    out, offsets, start = [], example.offsets(), 0
    for size in sizes:
        a, b = offsets[start], offsets[start + size]
        lengths = example.lengths[start : start + size]
        out.append(Encoded(example.ids[a:b], lengths, targets=example.targets[a:b]))
        start += size
    return out


def test_per_example_rows_keep_the_first_block_tokens_of_longer_examples():
    counts, rows, targets = packed(pack_examples, [EXAMPLES], 6)
    assert rows == [[1, 2, 11, EOS], [3, 12, 13, EOS], [4, 5, 6, 14, 15, 16], [7, 18, EOS]]
    assert targets[2] == [False, False, False, True, True, True]
    assert (counts.documents, counts.truncated, counts.short_rows) == (4, 1, 3)


@pytest.mark.parametrize("sizes", [[4], [1, 3], [2, 1, 1], [1, 1, 1, 1]])
def test_whole_examples_are_packed_greedily_and_never_split_across_rows(sizes):
    counts, rows, targets = packed(pack_whole_examples, batches_of(EXAMPLES, sizes), 8)
    assert rows == [
        [1, 2, 11, EOS, 3, 12, 13, EOS],
        [4, 5, 6, 14, 15, 16, 17, EOS],
        [7, 18, EOS],
    ]
    assert targets[0] == [False, False, True, True, False, True, True, True]
    assert (counts.documents, counts.truncated, counts.short_rows) == (4, 0, 1)


# --- the tokenized demo corpus -------------------------------------------------------------------


def independent_examples(data: dict, split: str) -> list[tuple[list[int], list[int]]]:
    """Each example of the split as (prompt ids, response ids), encoded here with the saved
    tokenizer from the split's own texts."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(data["tokenizer"])
    frame = pd.read_parquet(data["splits"][split])
    assert (frame["prompt"] + frame["response"]).tolist() == frame["text"].tolist()
    return [
        (
            tokenizer.encode(p, add_special_tokens=False),
            tokenizer.encode(r, add_special_tokens=False),
        )
        for p, r in zip(frame["prompt"], frame["response"], strict=True)
    ]


def expected_rows(data: dict, split: str):
    """The rows the tokenize stage must write, rebuilt from independent_examples."""
    info = TokenizedData.read(data["tokenize_manifest"], data["shards"])
    block, eos = info.block_size, info.eos_token_id
    examples = [(p, [*r, eos]) for p, r in independent_examples(data, split)]
    rows, targets, used = [], [], block
    for prompt, response in examples:
        ids, flags = (prompt + response)[:block], ([0] * len(prompt) + [1] * len(response))[:block]
        whole = info.job.tokenize.packing == "across_documents" and split == "train"
        if not whole or used + len(ids) > block:
            rows.append([]), targets.append([])
            used = 0
        rows[-1] += ids
        targets[-1] += flags
        used += len(ids)
    return rows, targets


@pytest.mark.parametrize("split", ["train", "test"])
def test_the_rows_are_the_splits_examples_with_the_responses_marked(qa_data, split):
    shards = read_shards(qa_data["shards"] / split)
    assert shards.schema.equals(INSTRUCTION_SCHEMA)
    rows, targets = expected_rows(qa_data, split)
    assert shards.column("input_ids").to_pylist() == rows
    assert [[int(t) for t in r] for r in shards.column("targets").to_pylist()] == targets
    arrays = rows_of(qa_data, split).arrays
    assert arrays.targets.tolist() == [t for r in targets for t in r]


@pytest.mark.parametrize("arch", ["gpt2", "lstm"])
def test_the_training_loss_is_the_mean_nll_of_the_response_tokens_alone(qa_data, arch):
    info = TokenizedData.read(qa_data["tokenize_manifest"], qa_data["shards"])
    assert info.job == TokenizeJob("causal_lm", info.job.tokenize, instruction=True)
    rows = rows_of(qa_data, "train").with_targets()
    index = np.arange(min(8, len(rows)))
    batch = rows.batch(index)
    torch.manual_seed(0)
    model = build_model(
        ModelSettings(arch=arch, n_layer=1, n_embd=32, n_head=2, dropout=0.0),
        "causal_lm",
        info.vocab_size,
        info.block_size,
        info.pad_token_id,
        info.eos_token_id,
        [],
    )
    model.eval()
    with torch.no_grad():
        loss = forward(model, dict(batch), CPU).loss
    # Independently: the rows' own tokens and response positions as expected_rows rebuilds them
    # from the split's texts, and the NLL read off the logits at those positions.
    expected, flags = expected_rows(qa_data, "train")
    numbers = rows.numbers(index)
    nll, count = 0.0, 0
    for row in numbers:
        ids = torch.tensor([expected[row]])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
        for position in range(1, len(expected[row])):
            if flags[row][position]:
                nll -= float(logp[position - 1, expected[row][position]])
                count += 1
    assert count == int((batch["labels"][:, 1:] != IGNORED_LABEL).sum())
    assert float(loss) == pytest.approx(nll / count, rel=1e-5)
    first = numbers[0]
    labels = batch["labels"][0, : len(expected[first])].tolist()
    wanted = zip(expected[first], flags[first], strict=True)
    assert labels == [t if f else IGNORED_LABEL for t, f in wanted]


# --- conversations (a messages column) ------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_tokenizer(lm_data, tmp_path_factory) -> str:
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("chat-tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(lm_data["tokenizer"])
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return str(folder)


def conversations_file(*conversations) -> bytes:
    return "".join(json.dumps({"messages": c}) + "\n" for c in conversations).encode()


def turn(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def test_a_conversation_is_learned_on_its_last_answer_with_the_turns_before_as_prompt(
    chat_tokenizer, tmp_path
):
    from tests.support.stage_data import run_clean

    read = ReadSettings(format="jsonl", messages_column="messages", chat_tokenizer=chat_tokenizer)
    data = conversations_file(
        [turn("user", "Hi <b>there</b>"), turn("assistant", "Hello!"), turn("user", "Refund?")]
        + [turn("assistant", "Sure, within 30 days.")],
        [turn("system", "Be brief."), turn("user", "Where is it?"), turn("assistant", "Shipped.")],
    )
    _, docs = run_clean(tmp_path, "chats.jsonl", data, read, CleanSettings(strip_html=True))
    assert docs["prompt"].tolist() == [
        "<|user|>Hi there\n<|assistant|>Hello!\n<|user|>Refund?\n<|assistant|>",
        "<|system|>Be brief.\n<|user|>Where is it?\n<|assistant|>",
    ]
    assert docs["response"].tolist() == ["Sure, within 30 days.\n", "Shipped.\n"]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["instruction"]["serving_template"] == "<|user|>{prompt}\n<|assistant|>"


@pytest.mark.parametrize(
    ("conversation", "says"),
    [
        (
            [turn("user", "Hi"), turn("assistant", "Hello"), turn("user", "Bye")],
            "ends with a 'user'",
        ),
        ("just text", "is not a list of"),
        ([{"role": "user"}], "is not a list of"),
    ],
)
def test_conversations_that_cannot_be_learned_are_refused_by_record(
    chat_tokenizer, tmp_path, conversation, says
):
    from snaketune.errors import CorpusError
    from tests.support.stage_data import run_clean

    read = ReadSettings(format="jsonl", messages_column="messages", chat_tokenizer=chat_tokenizer)
    data = conversations_file([turn("user", "Hi"), turn("assistant", "Hello")], conversation)
    with pytest.raises(CorpusError, match=f"record 2 of column 'messages' {says}"):
        run_clean(tmp_path, "chats.jsonl", data, read)


def test_a_conversation_the_chat_template_refuses_is_refused_by_record(lm_data, tmp_path):
    from transformers import AutoTokenizer

    from snaketune.errors import CorpusError
    from tests.support.stage_data import run_clean

    strict = AutoTokenizer.from_pretrained(lm_data["tokenizer"])
    strict.chat_template = (  # as templates that take no system turn do
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}"
        "<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    strict.save_pretrained(tmp_path / "strict")
    read = ReadSettings(
        format="jsonl", messages_column="messages", chat_tokenizer=str(tmp_path / "strict")
    )
    data = conversations_file(
        [turn("user", "Hi"), turn("assistant", "Hello")],
        [turn("system", "Be brief."), turn("user", "Hi"), turn("assistant", "Hello")],
    )
    refused = (
        r"record 2: the chat template of '.*strict' cannot render its turns "
        r"\['system', 'user'\] \(System role not supported\)"
    )
    with pytest.raises(CorpusError, match=refused):
        run_clean(tmp_path, "chats.jsonl", data, read)


def test_a_messages_column_needs_a_pretrained_tokenizer_and_no_template():
    config = config_with()
    dataset = config["datasets"]["support-demo"]
    del dataset["prompt_column"], dataset["response_column"]
    dataset["messages_column"] = "turns"
    problems = cross_checks(with_defaults(config))
    assert [p for p in problems if p.startswith("experiments[0].text_template:")], problems
    config["experiments"][0]["text_template"] = None
    problems = cross_checks(with_defaults(config))
    assert [p for p in problems if p.startswith("experiments[0].tokenizer.kind:")], problems


def test_conversations_read_from_parquet_as_from_jsonl(chat_tokenizer, tmp_path):
    from tests.support.stage_data import run_clean

    chats = [[turn("user", "Where is it?"), turn("assistant", "Shipped.")]]
    parquet = tmp_path / "chats.parquet"
    pd.DataFrame({"messages": chats, "n": [1]}).to_parquet(parquet)
    read = ReadSettings(format="parquet", messages_column="messages", chat_tokenizer=chat_tokenizer)
    (tmp_path / "p").mkdir()
    (tmp_path / "j").mkdir()
    _, from_parquet = run_clean(tmp_path / "p", "chats.parquet", parquet.read_bytes(), read)
    jsonl = ReadSettings(format="jsonl", messages_column="messages", chat_tokenizer=chat_tokenizer)
    _, from_jsonl = run_clean(tmp_path / "j", "chats.jsonl", conversations_file(*chats), jsonl)
    assert from_parquet[["prompt", "response"]].equals(from_jsonl[["prompt", "response"]])


def test_records_that_are_not_what_they_look_like_are_dropped_and_counted(tmp_path):
    """No answer (only the end marker would be learned, and an empty generation would score as
    exact), no prompt (learned as an answer to nothing; all such looked like duplicates), the
    end-of-text token's text inside an answer (encoded as a real end of text; HTML stripping
    took it for a tag): each is dropped and counted by its flaw in the cleaning report."""
    from tests.support.stage_data import run_clean

    read = ReadSettings(
        format="jsonl", prompt_column="question", response_column="answer", text_column="question"
    )
    records = [
        {"question": "Where is my parcel?", "answer": "It ships on Monday."},
        {"question": "Can I pay by card?", "answer": ""},
        {"question": "Can I pay later?", "answer": "<p> </p>"},  # blank once cleaned
        {"answer": "We open at nine."},  # no prompt
        {"question": "", "answer": "We close at five."},
        {"question": "Refund?", "answer": "Yes.<|endoftext|>Anything else?"},
    ]
    data = "".join(json.dumps(r) + "\n" for r in records).encode()
    report, docs = run_clean(tmp_path, "qa.jsonl", data, read, CleanSettings(strip_html=True))
    assert docs["prompt"].tolist() == ["Question: Where is my parcel?\nAnswer:"]
    assert report.removed == {"empty_response": 2, "empty_prompt": 2, "special_token_text": 1}


def test_a_conversation_with_an_empty_answer_or_a_special_token_is_dropped_and_counted(
    chat_tokenizer, tmp_path
):
    from tests.support.stage_data import run_clean

    read = ReadSettings(format="jsonl", messages_column="messages", chat_tokenizer=chat_tokenizer)
    data = conversations_file(
        [turn("user", "Hi"), turn("assistant", "Hello")],
        [turn("user", "Refund?"), turn("assistant", " ")],
        [turn("user", "Status?"), turn("assistant", "Shipped<|endoftext|>")],
    )
    report, docs = run_clean(tmp_path, "chats.jsonl", data, read)
    assert docs["response"].tolist() == ["Hello\n"]
    assert report.removed == {"empty_response": 1, "special_token_text": 1}

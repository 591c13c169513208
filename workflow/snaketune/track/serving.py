"""The registered model as `mlflow models serve` runs it: one MLflow pyfunc model over the train
stage's model folder (weights and tokenizer) for every architecture (GPT-2 and other transformers
causal LMs and classifiers, the LSTM baseline), which checks each request and then answers it
the way evaluation does.

Requests. `{"inputs": ["text", ...]}` (a list of texts; one string is one text), or a table of
one string column (`dataframe_split` / `dataframe_records`). A causal LM continues each text and
returns the text and its continuation; with an instruction template (the evaluation's, a chat
template's user turn included) each text is a question put into the template (without the
whitespace around it, which cleaning took from every training example's fields), and only the
answer comes back, as evaluation scores it. A classifier labels each text ({"label", "score"}).
A prompt longer than the context is cut from the left, leaving room for the new tokens
(evaluate.generation, as evaluation cuts its prompts); a text to classify is truncated to the
training rows' length.

A conversation (a list of {"role", "content"} turns) is not taken, even where a chat template
composed the training examples: the model was evaluated on one user turn inside its template,
so a request sends that turn's text and the template wraps it.

Params (causal LMs only), each optional, the evaluation's setting where absent:
`max_new_tokens` (1 to the model's positions less one prompt token, at most MAX_NEW_TOKENS),
`decoding` ("greedy" or "sample") or `do_sample` (true: sample), `temperature` (> 0), `top_k`
(>= 1) and `top_p` (above 0, at most 1), which apply to sampling only. Anything else gets HTTP
400 with a message that says what was expected: a value that is not a non-blank string, another
shape of input, a param a model does not take (a classifier takes none), a param out of bounds,
a sampling param with greedy decoding, or decoding and do_sample that disagree.

snaketune itself travels with the model (code_paths), so the server needs only the pinned
packages.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import mlflow.pyfunc
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from snaketune.evaluate.settings import DECODINGS, GREEDY, SAMPLE, EvalSettings
from snaketune.names import SAMPLING_KEYS
from snaketune.tasks import task_of
from snaketune.train.positions import model_positions

MODEL_ARTIFACT = "model"
UNBOUNDED = 1 << 30
MAX_NEW_TOKENS = 1024
"""A request's max_new_tokens beyond this is refused: a typo, not a wish (the LSTM has no
positions to bound it)."""
DECODING_KEYS = ("max_new_tokens", "decoding", *SAMPLING_KEYS, "seed", "context_length")
"""The evaluate settings the served model decodes with, as evaluation does."""
SERVING_CONFIG = "serving"
"""The model_config key holding what the served model is loaded with (serving_config)."""
EXPECTED_INPUT = (
    'texts: {"inputs": ["a text", ...]} (a list of non-blank strings), or a table of one '
    "string column"
)


def refused(message: str) -> MlflowException:
    """An error the scoring server answers with HTTP 400 and this message."""
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def signature(task: str):
    """One column of any type, so that the scoring server hands the values over unconverted
    (a string column would turn 5 into '5' and None into 'None'; request_texts checks them);
    a causal LM's params, each defaulting to None (the evaluation's setting)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import AnyType

    params = None
    if task_of(task).predicts_tokens:
        types = {
            "max_new_tokens": DataType.long,
            "decoding": DataType.string,
            "do_sample": DataType.boolean,
            "temperature": DataType.double,
            "top_k": DataType.long,
            "top_p": DataType.double,
        }
        params = ParamSchema([ParamSpec(name, kind, None) for name, kind in types.items()])
    return ModelSignature(inputs=Schema([ColSpec(AnyType())]), params=params)


def request_texts(model_input) -> list[str]:
    """A request's texts, checked: the values of its one column, each a non-blank string."""
    if hasattr(model_input, "columns"):
        columns = [str(c) for c in model_input.columns]
        # MLflow makes a list of {"role", "content"} turns a table and keeps its first column.
        if "role" in columns:
            raise refused(
                f"expected {EXPECTED_INPUT}; found a conversation of role/content turns, which "
                "is not taken: send the user's text (the model's template wraps it)"
            )
        if len(columns) != 1:
            raise refused(f"expected {EXPECTED_INPUT}; found columns {columns}")
        values = model_input.iloc[:, 0].tolist()
    else:
        values = list(model_input) if isinstance(model_input, list | tuple) else [model_input]
    for number, value in enumerate(values, start=1):
        if not isinstance(value, str):
            raise refused(f"expected {EXPECTED_INPUT}; found {described(value)} as input {number}")
        if not value.strip():
            raise refused(f"input {number} is empty: send a text to answer, not {value!r:.20}")
    return values


def described(value) -> str:
    # A JSON null reaches the model as None, or as NaN in a column of strings.
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "null"
    return f"{type(value).__name__} {value!r:.60}"


def request_settings(params: dict[str, Any] | None, base: EvalSettings, limit: int) -> EvalSettings:
    """The evaluation's decoding (`base`) with a request's params, checked; `limit` is the
    most new tokens a request may ask for."""
    given = {key: value for key, value in (params or {}).items() if value is not None}
    decoding = sampling_choice(given, base.decoding)
    if decoding == GREEDY and (extra := [key for key in SAMPLING_KEYS if key in given]):
        raise refused(
            f"{', '.join(extra)} apply to sampling; this request decodes greedily (the most "
            'likely token each step): add "decoding": "sample" or remove them'
        )
    new_tokens = given.get("max_new_tokens", base.max_new_tokens)
    if "max_new_tokens" in given and not 1 <= new_tokens <= limit:
        raise refused(f"max_new_tokens must be between 1 and {limit}; found {new_tokens}")
    temperature = given.get("temperature", base.temperature)
    if not (math.isfinite(temperature) and temperature > 0):
        raise refused(f"temperature must be a number above 0; found {temperature}")
    top_k = given.get("top_k", base.top_k)
    if top_k < 1:
        raise refused(f"top_k must be 1 or more; found {top_k}")
    top_p = given.get("top_p", base.top_p)
    if not 0 < top_p <= 1:
        raise refused(f"top_p must be above 0 and at most 1; found {top_p}")
    return replace(
        base,
        decoding=decoding,
        max_new_tokens=new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
    )


def sampling_choice(given: dict[str, Any], default: str) -> str:
    """greedy or sample: a request's `decoding`, or its `do_sample`, which must agree."""
    decoding = given.get("decoding")
    if decoding is not None and decoding not in DECODINGS:
        raise refused(f"decoding must be one of {list(DECODINGS)}; found {decoding!r}")
    if "do_sample" in given:
        from_flag = SAMPLE if given["do_sample"] else GREEDY
        if decoding is not None and decoding != from_flag:
            raise refused(
                f"decoding {decoding!r} and do_sample {given['do_sample']} disagree: give one"
            )
        decoding = from_flag
    return decoding or default


def refuse_unknown_params() -> None:
    """MLflow 3.17's PyFuncModel.predict drops a request's params that the signature does not
    declare, with a warning in the server log only (mlflow.models.utils._enforce_params_schema,
    called through mlflow.pyfunc's module namespace), so a misspelt param would be answered as
    if absent. Wrapped here to refuse them first, naming the params the model takes."""
    enforce = mlflow.pyfunc._enforce_params_schema
    if getattr(enforce, "refuses_unknown", False):
        return

    def strict(params, schema):
        names = [spec.name for spec in schema.params] if schema is not None else []
        unknown = sorted(set(map(str, params)) - set(names)) if isinstance(params, dict) else []
        if unknown:
            takes = f"its params are {', '.join(names)}" if names else "it takes no params"
            raise refused(f"unknown params {unknown} for this model: {takes}")
        return enforce(params, schema)

    strict.refuses_unknown = True
    mlflow.pyfunc._enforce_params_schema = strict


class ServedModel(mlflow.pyfunc.PythonModel):
    """The train stage's model folder, answering checked requests as evaluation does."""

    def load_context(self, context) -> None:
        from transformers import AutoTokenizer

        from snaketune.train.models import load_trained

        refuse_unknown_params()
        config: dict[str, Any] = dict(context.model_config[SERVING_CONFIG])
        folder = context.artifacts[MODEL_ARTIFACT]
        self.task, self.template = config["task"], config.get("prompt_template")
        self.settings = EvalSettings(**config["decoding"])
        self.model = load_trained(Path(folder), self.task).eval()
        # The evaluation's context: evaluate.context_length (an LM's), else the training rows'
        # length; unknown (0), the LSTM cuts nothing (it has no positions), a transformer cuts
        # to its positions.
        rows = int(config["context"]) or positions(self.model)
        lm_context = self.settings.context_length if task_of(self.task).predicts_tokens else 0
        self.context = lm_context or rows
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        # Prompts are cut to the context here (generation.prompt_ids), after they are encoded
        # whole: the tokenizer's own limit would only log transformers' warning that a long
        # prompt "will result in indexing errors", which the cut prevents.
        self.tokenizer.model_max_length = UNBOUNDED
        self.label_names = label_names(self.model)

    def predict(self, context, model_input, params=None) -> list:
        texts = request_texts(model_input)
        if task_of(self.task).predicts_tokens:
            # A prompt is cut to one token at least; the new ones must fit the positions.
            limit = min(MAX_NEW_TOKENS, positions(self.model) - 1)
            return self.generate(texts, request_settings(params, self.settings, limit))
        return self.classify(texts)

    def generate(self, texts: list[str], settings: EvalSettings) -> list[str]:
        from snaketune.evaluate.evaluation import CPU
        from snaketune.evaluate.generation import generate_many

        prompts = self.prompts(texts)
        # One prompt at a time, so that an answer does not depend on the request's other texts.
        new, _ = generate_many(self.model, self.tokenizer, prompts, settings, self.context, CPU)
        if (
            self.template
        ):  # the answer alone, stripped as evaluation scores it (snaketune.evaluate.qa)
            return [text.strip() for text in new]
        return [p + n for p, n in zip(prompts, new, strict=True)]

    def prompts(self, texts: list[str]) -> list[str]:
        """What the model continues: each text put into the prompt template (the training
        examples' prompt, the request's text standing for the user's), or the text itself. The
        text goes in stripped, as cleaning strips the fields the examples are composed of: a
        trailing newline would be a token before the template's end of turn that no trained
        prompt has."""
        if not self.template:
            return texts
        return [self.template.format(prompt=text.strip()) for text in texts]

    def classify(self, texts: list[str]) -> list[dict]:
        import torch

        rows = []
        for text in texts:  # unpadded, one at a time, as a GPT-2 head reads the last token
            encoded = self.tokenizer(
                text, truncation=True, max_length=self.context, return_tensors="pt"
            )
            with torch.no_grad():
                logits = self.model(
                    input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"]
                ).logits
            score, label = torch.softmax(logits[0].float(), -1).max(-1)
            rows.append({"label": self.label_names[int(label)], "score": float(score)})
        return rows


def positions(model) -> int:
    """A transformer's positions; the LSTM has none (UNBOUNDED)."""
    return model_positions(model) or UNBOUNDED


def label_names(model) -> list[str]:
    """The classes in output order: the LSTM's label_names, a transformer's id2label."""
    config = model.config
    if getattr(config, "label_names", None):
        return list(config.label_names)
    id2label = getattr(config, "id2label", None) or {}
    return [str(id2label[i]) for i in range(len(id2label))]


def serving_config(
    task: str, evaluate: dict[str, Any], prompt_template: str | None, context: int
) -> dict[str, Any]:
    """What the served model is loaded with (MLflow's model_config)."""
    return {
        "task": task,
        "prompt_template": prompt_template,
        "context": context,
        "decoding": {key: value for key, value in evaluate.items() if key in DECODING_KEYS},
    }


def log_served(model_dir: Path, config: dict[str, Any], name: str, requirements):
    """Log the model folder as the active run's pyfunc model `name`; returns mlflow's
    ModelInfo."""
    import snaketune

    return mlflow.pyfunc.log_model(
        name=name,
        python_model=ServedModel(),
        artifacts={MODEL_ARTIFACT: str(model_dir)},
        code_paths=[str(Path(snaketune.__file__).parent)],
        pip_requirements=requirements,
        # MLflow also logs a model_config as the run's params, flattened: under one key they
        # read serving/task, serving/decoding/... and cannot collide with the train run's own.
        model_config={SERVING_CONFIG: config},
        signature=signature(config["task"]),
    )

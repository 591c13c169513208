"""The LSTM baseline served like GPT-2: an MLflow pyfunc model over the train stage's model
folder (weights and tokenizer), answering the same requests (a list of texts) the same way.
A causal LM generates with its carried state (snaketune.generation) and the evaluation's
decoding; with an instruction template a request is a question and the answer alone comes back,
else the prompt and its continuation, as transformers' text-generation pipeline returns them.
A classifier labels each text ({"label", "score"}, as the text-classification pipeline does).
snaketune itself travels with the model (code_paths), so the server needs only the pinned
packages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow.pyfunc

from snaketune.names import CAUSAL_LM

MODEL_ARTIFACT = "model"
UNBOUNDED = 1 << 30


class LstmPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from transformers import AutoTokenizer

        from snaketune.models import load_trained
        from snaketune.settings import EvalSettings

        config: dict[str, Any] = dict(context.model_config)
        folder = context.artifacts[MODEL_ARTIFACT]
        # The training rows' length; unknown (0), nothing is cut (an LSTM has no positions).
        self.task, self.context = config["task"], int(config["context"]) or UNBOUNDED
        self.template = config.get("prompt_template")
        self.model = load_trained(Path(folder), self.task).eval()
        self.label_names = self.model.config.label_names or []
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.settings = EvalSettings(**config["decoding"])

    def predict(self, context, model_input, params=None) -> list:
        texts = texts_of(model_input)
        if self.task == CAUSAL_LM:
            return self.generate(texts)
        return self.classify(texts)

    def generate(self, texts: list[str]) -> list[str]:
        from snaketune.evaluation import CPU
        from snaketune.generation import generate_many

        prompts = [self.template.format(prompt=t) for t in texts] if self.template else texts
        new, _ = generate_many(
            self.model, self.tokenizer, prompts, self.settings, self.context, CPU
        )
        return new if self.template else [p + n for p, n in zip(prompts, new, strict=True)]

    def classify(self, texts: list[str]) -> list[dict]:
        import torch

        encoded = self.tokenizer(
            texts, truncation=True, max_length=self.context, padding=True, return_tensors="pt"
        )
        with torch.no_grad():
            logits = self.model(encoded["input_ids"], encoded["attention_mask"]).logits
        scores, labels = torch.softmax(logits.float(), -1).max(-1)
        return [
            {"label": self.label_names[int(label)], "score": float(score)}
            for label, score in zip(labels, scores, strict=True)
        ]


def texts_of(model_input) -> list[str]:
    """A request's texts: the signature's one string column, or a plain list."""
    if hasattr(model_input, "iloc"):
        return [str(t) for t in model_input.iloc[:, 0].tolist()]
    return [str(t) for t in model_input]


def log_lstm(model_dir: Path, config: dict[str, Any], name: str, requirements, signature):
    """Log the LSTM folder as the active run's pyfunc model `name`; returns mlflow's ModelInfo."""
    import snaketune

    return mlflow.pyfunc.log_model(
        name=name,
        python_model=LstmPyfunc(),
        artifacts={MODEL_ARTIFACT: str(model_dir)},
        code_paths=[str(Path(snaketune.__file__).parent)],
        pip_requirements=requirements,
        model_config=config,
        signature=signature,
    )

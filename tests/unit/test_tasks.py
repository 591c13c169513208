"""Each task is one object that the stages ask; no module compares task names."""

from __future__ import annotations

import ast

import peft
import pytest
import transformers

from snaketune.names import CAUSAL_LM, SEQUENCE_CLASSIFICATION, TASKS
from snaketune.schema import config_schema
from snaketune.tasks import BY_NAME, intended_use, task_of
from tests.support.repo import REPO

PACKAGE = REPO / "workflow" / "snaketune"
NAMES = {"CAUSAL_LM", "SEQUENCE_CLASSIFICATION", CAUSAL_LM, SEQUENCE_CLASSIFICATION}


def test_the_config_allows_exactly_the_tasks_there_are():
    experiment = config_schema()["properties"]["experiments"]["items"]
    assert experiment["properties"]["task"]["enum"] == list(TASKS) == list(BY_NAME)


@pytest.mark.parametrize("name", TASKS)
def test_each_task_names_classes_that_exist(name):
    task = task_of(name)
    for cls in (task.auto_model, task.gpt2_model, task.llama_model):
        assert hasattr(transformers, cls), cls
    assert peft.TaskType[task.peft_task_type]
    assert task.intended_use


def test_a_model_card_of_a_config_without_a_task_states_no_use():
    assert intended_use(CAUSAL_LM) == task_of(CAUSAL_LM).intended_use
    assert intended_use("n/a") == "Not stated for this task."


@pytest.mark.parametrize("name", TASKS)
def test_the_keys_a_task_owns_are_settings_of_an_experiment(name):
    experiment = config_schema()["properties"]["experiments"]["items"]["properties"]
    for dotted in task_of(name).own_keys:
        section, key = dotted.split(".")
        assert key in experiment[section]["properties"], dotted


def test_a_head_has_a_row_per_token_or_per_label():
    assert task_of(CAUSAL_LM).head_size(50257, 3) == 50257
    assert task_of(SEQUENCE_CLASSIFICATION).head_size(50257, 3) == 3


def compared_names(tree: ast.AST) -> list[int]:
    """Lines where a task's name (or its constant) is compared."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for side in [node.left, *node.comparators]:
                name = side.id if isinstance(side, ast.Name) else getattr(side, "value", None)
                if isinstance(name, str) and name in NAMES:
                    lines.append(node.lineno)
    return lines


def test_no_module_compares_task_names_but_the_tasks_own():
    found = {
        str(path.relative_to(PACKAGE)): lines
        for path in PACKAGE.rglob("*.py")
        if path.name != "tasks.py" and (lines := compared_names(ast.parse(path.read_text())))
    }
    assert found == {}


def test_the_finder_sees_a_comparison_either_way():
    assert compared_names(ast.parse("a = task == CAUSAL_LM\nb = 'causal_lm' != x")) == [1, 2]
    assert compared_names(ast.parse("task_of(t).predicts_tokens")) == []

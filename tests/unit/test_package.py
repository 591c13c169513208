"""The package's shape: no module imports, directly or through others, a module that imports it
back (at module level or inside a function: a cycle either way). And the tests' shape: a test
module or conftest takes shared code from tests/support only, never from another test module or
a conftest (importing one runs its module-level code and can register its fixtures twice)."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.support.repo import REPO

PACKAGE = REPO / "workflow" / "snaketune"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imported(path: Path, known: set[str]) -> set[str]:
    """The package modules `path` imports, with the packages above each (which load first)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from snaketune import settings` imports the module snaketune.settings
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            found |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & known
    return found


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imported(path, set(known)) - {name} for name, path in known.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return stack[stack.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_module_of_the_package_imports_itself_through_others():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle_through_three_modules():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_graph_sees_function_level_and_aliased_imports():
    graph = import_graph()
    assert (
        "snaketune.settings" in graph["snaketune.stages"]
    )  # `from snaketune.settings import to_json`
    assert (
        "snaketune.train.models" in graph["snaketune.track.registry"]
    )  # imported inside a function


def imports_from_tests(path: Path) -> set[str]:
    """The modules of the tests package that `path` imports, at any level, as dotted names;
    relative imports as `.name`."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "tests"}
        elif isinstance(node, ast.ImportFrom) and node.level:
            found.add("." * node.level + (node.module or ""))
        elif isinstance(node, ast.ImportFrom) and node.module.split(".")[0] == "tests":
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return found


def test_tests_share_code_through_tests_support_only():
    def allowed(name: str) -> bool:
        # `from tests.support import x` names the package and its module: both are allowed
        return name in {"tests", "tests.support"} or name.startswith("tests.support.")

    tests = REPO / "tests"
    found = {
        f"{path.relative_to(REPO)}: {name}"
        for path in tests.rglob("*.py")
        if tests / "support" not in path.parents
        for name in imports_from_tests(path)
        if not allowed(name)
    }
    assert not found, "import tests/support instead: " + ", ".join(sorted(found))


def test_the_test_import_finder_sees_function_level_and_package_imports(tmp_path):
    module = tmp_path / "test_x.py"
    module.write_text(
        "from tests.support.repo import REPO\n"
        "from tests import conftest\n"
        "def f():\n"
        "    from tests.unit.test_config import with_defaults\n"
        "    from . import test_y\n"
    )
    assert imports_from_tests(module) == {
        "tests.support.repo",
        "tests.support.repo.REPO",
        "tests",
        "tests.conftest",
        "tests.unit.test_config",
        "tests.unit.test_config.with_defaults",
        ".",
    }


IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc")


def test_an_installed_copy_validates_a_config_without_the_checkout(tmp_path):
    """Built as a wheel and installed elsewhere (not editable): the schema is made from the
    settings and the metric modules are package data, so nothing is looked up in the checkout;
    presets come from the workflow's folder, which the caller names."""
    wheel, site, source = tmp_path / "wheel", tmp_path / "site", tmp_path / "source"
    # A copy of what the wheel is built from: building writes build/ beside its sources.
    for name in ("pyproject.toml", "README.md"):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, source / name)
    shutil.copytree(PACKAGE, source / "workflow" / "snaketune", ignore=IGNORED)
    pip = [sys.executable, "-m", "pip", "--quiet"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", wheel, source],
        check=True,
        capture_output=True,
    )
    (built,) = wheel.glob("*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", site, built], check=True)
    code = (
        "import sys, yaml; from pathlib import Path\n"
        "import snaketune\n"
        "from snaketune.config import apply_preset, validated\n"
        "from snaketune.metrics import METRICS_DIR\n"
        "repo = Path(sys.argv[1])\n"
        "config = yaml.safe_load((repo / 'config.yaml').read_text())\n"
        "config['preset'] = 'sms-spam'\n"
        "apply_preset(config, {}, repo / 'presets')\n"
        "validated(config, repo)\n"
        "print(snaketune.__file__, [e['name'] for e in config['experiments']],\n"
        "      sorted(p.name for p in METRICS_DIR.iterdir() if p.is_dir()))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code, REPO],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(site)},
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith(str(site / "snaketune" / "__init__.py"))
    assert "sms-spam" in run.stdout and "'token_f1'" in run.stdout


PIPELINE = ("data", "tokenize", "train", "evaluate", "track")
"""The stage packages in the order the pipeline runs them."""


def later_stages_imported(path: Path, stage: str) -> set[str]:
    """The stage packages after `stage` that the module at `path` imports, at any level."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "snaketune" and len(parts) > 1 and parts[1] in PIPELINE:
                if PIPELINE.index(parts[1]) > PIPELINE.index(stage):
                    found.add(parts[1])
    return found


def test_a_stage_package_imports_only_the_stages_before_it_and_the_core():
    found = {
        str(path.relative_to(PACKAGE)): later
        for stage in PIPELINE
        for path in (PACKAGE / stage).rglob("*.py")
        if (later := later_stages_imported(path, stage))
    }
    assert found == {}


def test_the_stage_order_check_sees_an_import_of_a_later_stage(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from snaketune.track import live\n")
    assert later_stages_imported(module, "train") == {"track"}
    assert later_stages_imported(module, "track") == set()

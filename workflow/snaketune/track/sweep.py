"""Sweeps: one experiment entry that stands for many, and the table that compares them.

    experiments:
      - name: lm
        ...
        sweep:
          grid: {train.lr: [0.001, 0.003], model.n_layer: [1, 2]}   # every combination
          points: [{train.lr: 0.01, model.n_layer: 1}]              # and these, as written

Before validation the entry becomes one experiment per point (`lm.lr-0.001.n_layer-1`, ...),
each validated like any other and marked with `swept: {of, point}`; their data stages are
shared (snaketune.sharing) whenever the swept keys do not reach them. The summarize_sweep job
then writes results/sweeps/<name>/: a table (one row per point: its swept values, its eval
metrics, its MLflow parent run) and a plot of each metric against the swept keys, both in the
Snakemake report and logged to an MLflow run of the sweep; every run of a point carries the tag
snaketune.track.sweep.
"""

from __future__ import annotations

import copy
import itertools
import re
from dataclasses import fields
from pathlib import Path
from typing import Any

from snaketune.context import IN_PROCESS, JobContext
from snaketune.names import name_problem
from snaketune.sections import SECTIONS
from snaketune.track.paths import SweepPaths
from snaketune.track.settings import SWEPT, SweepSettings
from snaketune.track.stage_log import SWEEP_TAG

SWEEP = "sweep"
"""The experiment entry's key that declares a sweep."""
SUMMARY_TAG = "snaketune.sweep_summary"
"""On the sweep's own MLflow run (the table and the plot)."""
PLOTTED = ("perplexity", "bits_per_byte", "next_token_accuracy", "accuracy", "macro_f1")
"""The eval metrics (of metrics.json) the sweep's plot shows against the swept keys."""
_UNSAFE_IN_NAME = re.compile(r"[^A-Za-z0-9_.-]")


# --- expansion (before validation; nothing heavy) ----------------------------------------------


def expand_sweeps(config: dict[str, Any]) -> list[str]:
    """Replace each experiment entry with a `sweep:` by one entry per point, in place; the
    problems of the sweeps as written, by key (nothing is replaced when there are any)."""
    experiments: list[Any] = []
    written: list[str] = []  # where each experiment comes from, as the user wrote it
    sweeps: dict[str, int] = {}
    problems = []
    for i, exp in enumerate(config.get("experiments") or []):
        if isinstance(exp, dict) and SWEPT in exp:
            problems.append(
                f"experiments[{i}].{SWEPT}: is set by the sweep expansion; declare a sweep "
                f"with `{SWEEP}:` instead"
            )
        if not isinstance(exp, dict) or SWEEP not in exp:
            experiments.append(exp)
            written.append(f"experiments[{i}]")
            continue
        if problem := name_problem(exp.get("name"), "sweep"):
            problems.append(f"experiments[{i}].name: {problem}")
            continue
        if exp["name"] in sweeps:  # one results/sweeps/<name> folder and summary run for both
            problems.append(
                f"experiments[{i}].name: sweep {exp['name']!r} is declared by "
                f"experiments[{sweeps[exp['name']]}] too; give each sweep its own name"
            )
            continue
        sweeps[exp["name"]] = i
        points, found = declared_points(exp[SWEEP], f"experiments[{i}].{SWEEP}")
        problems += found
        experiments += [point_experiment(exp, point) for point in points]
        written += [f"experiments[{i}].{SWEEP} point {point_label(point)}" for point in points]
    problems += repeated_names(experiments, written)
    if not problems:
        config["experiments"] = experiments
        config[WRITTEN] = written
    return problems


WRITTEN = "_written_as"
"""The expanded config's key (removed before the schema sees it, by as_written) that says
where each experiment was written."""


def point_label(point: dict[str, Any]) -> str:
    return "{" + ", ".join(f"{key}: {value!r}" for key, value in point.items()) + "}"


def repeated_names(experiments: list[Any], written: list[str]) -> list[str]:
    """Two experiments of one name (two entries, a point given twice, a point named as another
    entry) would share one results folder: each named by where the user wrote it."""
    first: dict[str, str] = {}
    problems = []
    for exp, where in zip(experiments, written, strict=True):
        name = exp.get("name") if isinstance(exp, dict) else None
        if not isinstance(name, str):
            continue
        if name not in first:
            first[name] = where
        elif first[name] == where:
            problems.append(f"{where}: is given twice (in grid and points, or twice in points)")
        else:
            problems.append(
                f"{where}: is named {name!r}, as {first[name]} is: each experiment needs its "
                "own name (its results folder and MLflow runs)"
            )
    return problems


def as_written(problems: list[str], config: dict[str, Any]) -> list[str]:
    """Problems of the expanded experiments (`experiments[k]...`) named by where the user wrote
    them: a sweep's point, not its place in the expanded list."""
    written = config.get(WRITTEN)
    if not written:
        return problems

    def where(match: re.Match) -> str:
        index = int(match[1])
        return written[index] if index < len(written) else match[0]

    return [re.sub(r"^experiments\[(\d+)\]", where, problem) for problem in problems]


def declared_points(sweep: Any, where: str) -> tuple[list[dict[str, Any]], list[str]]:
    """The points a `sweep:` entry names (the grid's combinations, then the listed points)."""
    if not isinstance(sweep, dict) or set(sweep) - {"grid", "points"} or not sweep:
        return [], [f"{where}: must be a mapping with `grid` and/or `points`"]
    grid, listed = sweep.get("grid") or {}, sweep.get("points") or []
    problems = []
    if not isinstance(grid, dict):
        problems.append(f"{where}.grid: must map dotted keys to lists of values")
        grid = {}
    for key, values in grid.items():
        problems += key_problems(key, f"{where}.grid")
        if not isinstance(values, list) or not values:
            problems.append(f"{where}.grid.{key}: must be a non-empty list of values")
    if not isinstance(listed, list) or not all(isinstance(p, dict) and p for p in listed):
        problems.append(f"{where}.points: must be a list of {{dotted key: value}} mappings")
        listed = []
    for j, point in enumerate(listed):
        for key in point:
            problems += key_problems(key, f"{where}.points[{j}]")
    if problems:
        return [], problems
    combos = [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]
    points = [p for p in combos if p] + [dict(p) for p in listed]
    if not points:
        return [], [f"{where}: names no point; give grid values or points"]
    return points, []


def key_problems(key: Any, where: str) -> list[str]:
    """A swept key must be `<section>.<setting>` of a section an experiment has."""
    section, _, name = str(key).partition(".")
    if section not in SECTIONS:
        return [
            f"{where}.{key}: sweeps a key of a section ({sorted(SECTIONS)}), as "
            "'<section>.<setting>', e.g. train.lr"
        ]
    allowed = sorted(f.name for f in fields(SECTIONS[section]))
    if name not in allowed:
        return [f"{where}.{key}: {section} has no setting {name!r}; allowed are {allowed}"]
    return []


def point_experiment(entry: dict[str, Any], point: dict[str, Any]) -> dict[str, Any]:
    experiment = copy.deepcopy({k: v for k, v in entry.items() if k != SWEEP})
    for key, value in point.items():
        section, _, name = key.partition(".")
        experiment.setdefault(section, {})
        experiment[section] = {**experiment[section], name: value}
    experiment["name"] = point_name(entry["name"], point)
    experiment[SWEPT] = {"of": entry["name"], "point": dict(point)}
    return experiment


def point_name(sweep: str, point: dict[str, Any]) -> str:
    """`<sweep>.<setting>-<value>...`: readable, and a valid folder name."""
    leaves = [key.rpartition(".")[2] for key in point]
    parts = [
        f"{key if leaves.count(key.rpartition('.')[2]) > 1 else key.rpartition('.')[2]}-{value}"
        for key, value in point.items()
    ]
    return _UNSAFE_IN_NAME.sub("_", ".".join([sweep, *parts]))


# --- the summary job ---------------------------------------------------------------------------


def summarize_sweep(
    paths: SweepPaths, settings: SweepSettings, context: JobContext = IN_PROCESS
) -> list[dict[str, Any]]:
    """Write the sweep's table and plot, and log them to the sweep's MLflow run."""
    from snaketune import plots, tables
    from snaketune.fileio import read_json
    from snaketune.manifest import stage_manifest
    from snaketune.track.model_card import headline

    with stage_manifest(paths, settings, context=context) as record:
        rows = []
        points = zip(settings.experiments, paths.metrics, paths.runs, strict=True)
        for experiment, metrics_path, runs_path in points:
            record.add_input(f"metrics.{experiment}", metrics_path)
            record.add_input(f"runs.{experiment}", runs_path)
            metrics = read_json(metrics_path)
            rows.append(
                {
                    "experiment": experiment,
                    **settings.values[experiment],
                    **headline(metrics),
                    "mlflow_run_id": read_json(runs_path)["runs"]["parent"],
                }
            )
        write_table(rows, paths.table)
        tables.csv_page(paths.table, paths.table_html, f"Sweep {settings.name}")
        keys = list(dict.fromkeys(k for e in settings.experiments for k in settings.values[e]))
        plots.sweep(rows, keys, plotted_metrics(rows), paths.plot, settings.name)
        record.counts = {"points": len(rows), "swept_keys": len(keys)}
        log_sweep(paths, settings, rows)
    return rows


def plotted_metrics(rows: list[dict[str, Any]]) -> list[str]:
    """The quality metrics the points have, in PLOTTED's order (the table has every number)."""
    return [name for name in PLOTTED if any(name in row for row in rows)]


def write_table(rows: list[dict[str, Any]], out: Path) -> None:
    import pandas as pd

    from snaketune.fileio import atomic_path

    with atomic_path(out) as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)


def log_sweep(paths: SweepPaths, settings: SweepSettings, rows: list[dict[str, Any]]) -> str:
    """The sweep's own MLflow run (found again on a rerun): the table, the plot, and each
    point's parent run id."""
    import json

    from snaketune.track.reconcile import opened_store
    from snaketune.track.tracking_uri import store_uri

    artifacts = Path(paths.artifacts).resolve().as_uri()
    configured = store_uri(settings.tracking_uri, paths.store)
    with opened_store(configured, settings.mlflow_experiment, artifacts) as (client, _, exp_id):
        query = f"tags.`{SUMMARY_TAG}` = '{settings.name}'"
        found = client.search_runs([exp_id], query, max_results=1)
        tags = {SUMMARY_TAG: settings.name, SWEEP_TAG: settings.name}
        run_id = (
            found[0].info.run_id
            if found
            else client.create_run(exp_id, run_name=f"sweep {settings.name}", tags=tags).info.run_id
        )
        for path in (paths.table, paths.plot):
            client.log_artifact(run_id, str(path))
        points = {row["experiment"]: row["mlflow_run_id"] for row in rows}
        client.set_tag(run_id, "snaketune.sweep_points", json.dumps(points))
        client.set_terminated(run_id, "FINISHED")
    return run_id

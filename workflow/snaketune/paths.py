"""A job's paths, declared once: a frozen dataclass whose field names are the rule's `input:`,
`output:` and `params:` names, each field saying its role, what it holds and, for an output,
its file name in the stage's folder (`Paths.under`).

Each stage package declares its jobs' paths in its `paths.py`; snaketune.stages makes the
rules' shell commands, the CLI and the manifests' records from them, and the rules' `output:`
and the in-process helpers (snaketune.local) take the file names from them."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import Field, dataclass, field, fields
from pathlib import Path
from typing import Any

INPUT, OUTPUT, STATE = "input", "output", "params"
"""A path's role is the rule directive that holds it. STATE paths go through params: Snakemake
neither tracks nor deletes them (a checkpoint folder must outlive a failed job)."""


def input_path(doc: str, *, digest: bool = True) -> Any:
    """A path the job reads; its sha256 goes to the manifest unless digest is False (when a
    finer record exists, such as the partition manifests' per-shard digests)."""
    return field(metadata={"role": INPUT, "doc": doc, "digest": digest})


MANIFEST = "manifest.json"
"""Every job's manifest, in its stage's folder (snaketune.manifest)."""


def output_path(
    doc: str, *, name: str, artifact: bool = False, digest: bool = True, folder: bool = False
) -> Any:
    """A path the job writes, `name` in the stage's folder (`folder`: a directory); an artifact
    is mirrored to the stage's MLflow run."""
    metadata = {"role": OUTPUT, "doc": doc, "digest": digest, "artifact": artifact}
    return field(metadata={**metadata, "name": name, "folder": folder})


def manifest_path() -> Any:
    return output_path("this job's manifest.json", name=MANIFEST)


def page_path(doc: str, *, of: str) -> Any:
    """An HTML page of the output `of` for the Snakemake report, which shows HTML inline and
    other files only as links (snaketune.tables): `of`'s name with .html. Pages come last, with
    a default, so calls that give the other paths stay as they are."""
    metadata = {"role": OUTPUT, "doc": f"{doc} (the Snakemake report)", "digest": True}
    return field(default=None, metadata={**metadata, "artifact": False, "beside": of})


def state_path(doc: str) -> Any:
    return field(metadata={"role": STATE, "doc": doc, "digest": False})


@dataclass(frozen=True)
class Paths:
    """Base of every job's paths: strings become Paths, lists of them lists of Paths."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and "beside" in f.metadata:
                value = Path(getattr(self, f.metadata["beside"])).with_suffix(".html")
            typed = [Path(v) for v in value] if isinstance(value, list | tuple) else Path(value)
            object.__setattr__(self, f.name, typed)

    @classmethod
    def under(cls, folder: Path | str, **given: Any) -> Paths:
        """The job's paths with every output in `folder` under its name, as the workflow lays
        them out; its inputs and state paths (and any output put elsewhere) as given. A name's
        wildcards (a partition's `{part}`) are filled from `given` too."""
        named = {n: Path(folder) / p for n, p in output_names(cls, given).items()}
        outputs = {n: given.pop(n, path) for n, path in named.items()}
        return cls(**outputs, **{n: v for n, v in given.items() if n not in WILDCARDS})

    @classmethod
    def output_in(cls, folder: Path | str, name: str, **wildcards: Any) -> Path:
        """Where the output `name` of a job that wrote into `folder` is (for a reader of
        results/ that has no job's paths at hand)."""
        return Path(folder) / output_names(cls, wildcards)[name]

    @classmethod
    def output_files(cls, folder: str) -> dict[str, tuple[str, bool]]:
        """Each output as the rule's `output:` spells it, `folder`/name with its wildcards
        left to Snakemake, and whether it is a directory."""
        return {
            f.name: (f"{folder}/{output_name(cls, f)}", f.metadata.get("folder", False))
            for f in path_fields(cls, OUTPUT)
        }


WILDCARDS = ("part",)
"""Wildcards an output's name may hold ({part}), given to `Paths.under` by name."""


def output_name(paths: type[Paths], f: Field) -> str:
    """An output's name in its stage's folder; a page's is its table's with .html."""
    if "beside" in f.metadata:
        beside = next(g for g in fields(paths) if g.name == f.metadata["beside"])
        return str(Path(output_name(paths, beside)).with_suffix(".html"))
    return f.metadata["name"]


def output_names(paths: type[Paths], wildcards: dict[str, Any]) -> dict[str, str]:
    values = {w: wildcards[w] for w in WILDCARDS if w in wildcards}
    return {f.name: output_name(paths, f).format(**values) for f in path_fields(paths, OUTPUT)}


def path_fields(paths: type[Paths] | Paths, role: str | None = None) -> Iterator[Field]:
    return (f for f in fields(paths) if role is None or f.metadata["role"] == role)


def is_list(f: Field) -> bool:
    return str(f.type).startswith("list")

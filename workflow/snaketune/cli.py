"""`snaketune <command>`: the command each rule runs, made from the job definitions in
snaketune.stages: one required option per path, `--settings` with the job's settings as JSON
(snaketune.settings.to_json), then the library function the stage names."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

# Bitwise-reproducible BLAS on the CPU: MKL's results otherwise depend on the memory alignment
# of the arrays, which differs from one process to the next (a SLURM job and a local run of the
# same training were seen 1e-6 apart). Strict conditional numerical reproducibility, and the
# fixed thread count that MKL's reproducibility conditions ask for (with dynamic threads it may
# use fewer threads on a busy machine, and sum in another order), set before anything loads
# MKL; a value the user set wins.
REPRODUCIBLE_BLAS = {"MKL_CBWR": "AUTO,STRICT", "MKL_DYNAMIC": "FALSE", "OMP_DYNAMIC": "FALSE"}
for _name, _value in REPRODUCIBLE_BLAS.items():
    os.environ.setdefault(_name, _value)

from snaketune.errors import SnaketuneError  # noqa: E402 (after the environment is set)
from snaketune.settings import from_json  # noqa: E402
from snaketune.stages import BY_COMMAND, STAGES, Paths, Stage, flag, is_list, path_fields  # noqa: E402

# ValueError/OSError cover bad settings values and missing or unreadable files.
USER_ERRORS = (SnaketuneError, ValueError, OSError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="snaketune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for stage in STAGES:
        job = sub.add_parser(stage.command, help=f"rule {stage.rule}")
        for f in path_fields(stage.paths):
            nargs = "+" if is_list(f) else None
            job.add_argument(flag(f), type=Path, nargs=nargs, required=True, help=f.metadata["doc"])
        job.add_argument("--settings", required=True, help="the job's settings as JSON")
    return parser


def parse(argv: list[str] | None) -> tuple[Stage, Paths, str]:
    """The stage a command line names, its paths, and its settings' JSON."""
    args = build_parser().parse_args(argv)
    stage = BY_COMMAND[args.command]
    paths = stage.paths(**{f.name: getattr(args, f.name) for f in path_fields(stage.paths)})
    return stage, paths, args.settings


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    stage, paths, settings = parse(argv)
    try:
        stage.entry()(paths, from_json(stage.settings, settings))
    except USER_ERRORS as err:
        # Known failure modes carry a message meant for the user; a traceback would bury it.
        print(f"snaketune {stage.command}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

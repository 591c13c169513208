"""`snaketune <stage>`: the command each rule runs. It only parses paths and the stage's settings
(one JSON object, built from the validated config by the workflow) and calls the library."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from snaketune.clean import CleanSettings, ReadSettings
from snaketune.errors import SnaketuneError

# ValueError/OSError cover bad settings values and missing or unreadable files.
USER_ERRORS = (SnaketuneError, ValueError, OSError)


def _download(args, s):
    from snaketune.download import DownloadSettings, download_dataset

    download_dataset(DownloadSettings(**s), args.out, args.manifest)


def _clean(args, s):
    from snaketune.clean import clean_corpus

    clean_corpus(
        args.raw,
        args.corpus,
        args.report,
        args.manifest,
        ReadSettings(**s["read"]),
        CleanSettings(**s["clean"]),
        s.get("member"),
    )


def _split(args, s):
    from snaketune.split import SplitSettings, split_corpus

    outputs = {"train": args.train, "val": args.val, "test": args.test}
    split_corpus(args.corpus, outputs, args.manifest, SplitSettings(**s))


def _tokenizer(args, s):
    from snaketune.tokenizer import TokenizerSettings, prepare_tokenizer

    prepare_tokenizer(args.train, args.out, args.manifest, TokenizerSettings(**s))


def _tokenize(args, s):
    from snaketune.shards import TokenizeSettings, tokenize_shards

    splits = {"train": args.train, "val": args.val, "test": args.test}
    tokenize_shards(splits, args.tokenizer, args.out, args.manifest, TokenizeSettings(**s))


def _tokenize_plan(args, s):
    from snaketune.partitions import plan_partitions
    from snaketune.shards import TokenizeSettings

    splits = {"train": args.train, "val": args.val, "test": args.test}
    plan_partitions(splits, args.tokenizer, args.plan, args.encoder, TokenizeSettings(**s))


def _tokenize_partition(args, s):
    from snaketune.shards import TokenizeSettings, tokenize_partition

    split, part = s.pop("split"), s.pop("part")  # the job's wildcards
    tokenize_partition(
        args.split_file,
        args.plan,
        args.encoder,
        split,
        part,
        args.out,
        args.manifest,
        TokenizeSettings(**s),
    )


def _tokenize_gather(args, s):
    from snaketune.shards import TokenizeSettings, gather_shards

    splits = {"train": args.train, "val": args.val, "test": args.test}
    gather_shards(
        splits,
        args.tokenizer,
        args.plan,
        args.parts,
        args.out,
        args.manifest,
        TokenizeSettings(**s),
    )


def _train(args, s):
    from snaketune.models import ModelSettings
    from snaketune.train import TrainSettings, train_model

    train_model(
        args.shards,
        args.tokenize_manifest,
        args.tokenizer,
        args.out,
        args.history,
        args.manifest,
        args.state_dir,
        s["task"],
        ModelSettings(**s["model"]),
        TrainSettings(**s["train"]),
    )


def _evaluate(args, s):
    from snaketune.evaluation import EvalSettings, evaluate_model

    splits = {"train": args.train, "test": args.test}
    metrics = evaluate_model(
        args.model,
        args.shards,
        args.tokenize_manifest,
        splits,
        args.metrics,
        args.samples,
        args.manifest,
        s["task"],
        EvalSettings(**s["evaluate"]),
    )
    logging.getLogger(__name__).info(
        "metrics: %s",
        json.dumps({k: v for k, v in metrics.items() if not isinstance(v, dict | list)}),
    )


def _track(args, s):
    from snaketune.track import StageFiles, TrackSettings, track_experiment

    stages = [
        StageFiles(name, Path(manifest), tuple(Path(a) for a in artifacts))
        for name, manifest, *artifacts in args.stage
    ]
    track_experiment(
        TrackSettings(**s),
        stages,
        args.history,
        args.metrics,
        args.runs,
        model_dir=args.model,
        system_metrics=args.system_metrics,
    )


STAGES = {
    "download": (_download, ["out", "manifest"]),
    "clean": (_clean, ["raw", "corpus", "report", "manifest"]),
    "split": (_split, ["corpus", "train", "val", "test", "manifest"]),
    "tokenizer": (_tokenizer, ["train", "out", "manifest"]),
    "tokenize": (_tokenize, ["train", "val", "test", "tokenizer", "out", "manifest"]),
    "tokenize-plan": (_tokenize_plan, ["train", "val", "test", "tokenizer", "plan", "encoder"]),
    "tokenize-partition": (
        _tokenize_partition,
        ["split-file", "plan", "encoder", "out", "manifest"],
    ),
    "tokenize-gather": (
        _tokenize_gather,
        ["train", "val", "test", "tokenizer", "plan", "parts", "out", "manifest"],
    ),
    "train": (
        _train,
        ["shards", "tokenize-manifest", "tokenizer", "out", "history", "manifest", "state-dir"],
    ),
    "evaluate": (
        _evaluate,
        ["model", "shards", "tokenize-manifest", "train", "test", "metrics", "samples", "manifest"],
    ),
    "track": (_track, ["history", "metrics", "runs", "model", "system-metrics"]),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="snaketune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, paths) in STAGES.items():
        stage = sub.add_parser(name)
        for path in paths:
            stage.add_argument(f"--{path}", type=Path, required=True)
        stage.add_argument("--settings", required=True, help="the stage's settings as JSON")
        if name == "track":
            stage.add_argument(
                "--stage",
                nargs="+",
                action="append",
                required=True,
                metavar=("NAME MANIFEST", "ARTIFACT"),
                help="a stage's name, its manifest, then artifacts to log",
            )
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    args = build_parser().parse_args(argv)
    handler = STAGES[args.command][0]
    try:
        handler(args, json.loads(args.settings))
    except USER_ERRORS as err:
        # Known failure modes carry a message meant for the user; a traceback would bury it.
        print(f"snaketune {args.command}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

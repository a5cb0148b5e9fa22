"""The `harness` command: pack, train, show, predict, report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from harness.errors import HarnessError, OptionParser, given, given_path, run_guarded, signals_held
from harness.stopping import StopRequest

SHADES = " .:-=+*#%@"


DEFAULT_DOWNLOAD_DIR = Path("data/mnist")


def cmd_pack(args) -> int:
    from harness.data.download import MIRRORS, download_mnist
    from harness.data.pack import check_output_dir, pack
    from harness.data.sources import load_source

    check_output_dir(args.out)  # fail before a download or a long read
    if args.source == "download":
        source_dir = download_mnist(args.download_dir or DEFAULT_DOWNLOAD_DIR, mirrors=args.mirror or MIRRORS)
        name = "mnist"
    else:
        ignored = [option for option, value in (("--download-dir", args.download_dir), ("--mirror", args.mirror)) if value]
        if ignored:
            raise HarnessError(f"{' and '.join(ignored)}: for --source download only, not a directory ({args.source})")
        source_dir, name = Path(args.source), args.name
    dataset = load_source(source_dir, name, stream=True)  # IDX blocks stream into the shards
    manifest = pack(dataset, args.out, shard_size=args.shard_size, block_size=args.block_size)
    for split, info in manifest["splits"].items():
        print(f"{split}: {info['samples']:,} images in {len(info['shards'])} shard(s) of blocks of {info['block_size']}")
    print(f"wrote {args.out}/manifest.json")
    return 0


def cmd_show(args) -> int:
    from harness.data.shard_set import ShardSource, ShardSplit, index_problem

    source = ShardSource(args.shards)  # once: from a URL, opening it fetches the manifest
    problem = index_problem(args.shards, args.split, args.index, len(ShardSplit(source, args.split)))
    if problem:
        raise HarnessError(problem)
    images, labels = ShardSplit(source, args.split, args.index, args.index + 1).load_all()
    print(f"{args.split}[{args.index}]  label {int(labels[0])}")
    for row in images[0]:
        print("".join(SHADES[int(v) * (len(SHADES) - 1) // 255] * 2 for v in row).rstrip())
    return 0


def cmd_report(args) -> int:
    from harness.report import write_report

    written, skipped = write_report(args.run_dir)
    for path in written:
        print(f"wrote {path}")
    for reason in skipped:
        print(f"skipped {reason}")
    return 0


def cmd_predict(args) -> int:
    from harness.predict import run_predict

    return run_predict(args)


def build_parser() -> argparse.ArgumentParser:
    from harness.data.pack import DEFAULT_BLOCK_SIZE, DEFAULT_SHARD_SIZE
    from harness.train import build_parser as build_train_parser
    from harness.train import run_from_args

    parser = OptionParser(prog="harness", description="Distributed data-parallel MNIST training harness.", allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("pack", help="pack a dataset into webdataset shards with a manifest", allow_abbrev=False)
    p.add_argument("--source", type=given, required=True, help="a directory of IDX or CSV files, or 'download' for MNIST from the public mirrors")
    p.add_argument("--out", type=given_path, default=Path("shards"), help="output directory (default shards/)")
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help=f"images per shard (default {DEFAULT_SHARD_SIZE})")
    p.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE, help=f"images per webdataset sample (default {DEFAULT_BLOCK_SIZE})")
    p.add_argument("--name", help="dataset name for the manifest (default: the source directory's name)")
    p.add_argument("--download-dir", type=given_path, help=f"where --source download puts the files (default {DEFAULT_DOWNLOAD_DIR})")
    p.add_argument("--mirror", type=given, action="append", help="mirror URL to download from instead of the standard ones (repeatable)")
    p.set_defaults(function=cmd_pack, parser=p)

    p = commands.add_parser("train", help="train a model on packed shards", allow_abbrev=False)
    build_train_parser(p)
    p.set_defaults(function=run_from_args, parser=p)

    p = commands.add_parser("show", help="print one image of the shards as text art", allow_abbrev=False)
    p.add_argument("--shards", type=given, default="shards", help="shard directory or URL, as for train (default shards/)")
    p.add_argument("--split", default="train", choices=("train", "test"), help="split of --shards (default train)")
    p.add_argument("--index", type=int, required=True, metavar="N", help="image number in the split")
    p.set_defaults(function=cmd_show, parser=p)

    p = commands.add_parser("predict", help="classify digits: image files, or images of a shard set", allow_abbrev=False)
    p.add_argument("model", type=given_path, metavar="RUN_DIR_OR_CHECKPOINT", help="a run directory, its model.pt, or a checkpoint (step-N.pt)")
    p.add_argument("images", type=Path, nargs="*", metavar="IMAGE", help="PNG or JPEG pictures of one digit each (any size, colour, polarity)")
    p.add_argument("--shards", type=given, help="classify images of this shard set, a directory or URL (with --index)")
    p.add_argument("--split", choices=("train", "test"), help="split of --shards (default test)")
    p.add_argument("--index", type=int, nargs="+", metavar="N", help="image numbers in the split")
    p.add_argument("--json", action="store_true", help="print the predictions as one JSON object")
    p.set_defaults(function=cmd_predict, parser=p)

    p = commands.add_parser("report", help="draw a run's training curves, filters and confusion matrix into RUN_DIR/report/", allow_abbrev=False)
    p.add_argument("run_dir", type=given_path, metavar="RUN_DIR")
    p.set_defaults(function=cmd_report, parser=p)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Guarded from the start: build_parser imports torch (1.5-2.5 s), and a Ctrl-C or a
    # SIGTERM then ends the command as at any later moment, with one line, not a traceback.
    return run_guarded(parse_and_run, argv)


def parse_and_run(argv: list[str] | None) -> int:
    # The command is the first argument (the top level has no options of its own but -h).
    training = (sys.argv[1:] if argv is None else argv)[:1] == ["train"]
    stop_request = None
    with signals_held() as noted:  # until torch is imported: see signals_held
        parser = build_parser()
        if training:
            # A rank honours a stop signal through all of its start-up (harness.train.train),
            # so one that came while it imported torch is a stop too, not its end: under a
            # launcher, that ended the rank with no stop record (a job not requeued). Its
            # handlers first, then the noted signals: none falls between the two.
            stop_request = StopRequest()
            stop_request.replay(noted)
            noted.clear()
    args, unknown = parser.parse_known_args(argv)
    args.stop_request = stop_request
    if unknown:  # the command's usage, not the top level's (argparse's own would show `harness {pack,train,...}`)
        args.parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args.function(args)


if __name__ == "__main__":
    sys.exit(main())

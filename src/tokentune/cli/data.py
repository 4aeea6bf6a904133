"""``tokentune data``: prepare datasets (``prepare-vtab``: a VTAB-1k task into the prepared layout)."""
from __future__ import annotations

import argparse

from ..errors import TokenTuneError
from ..tools.vtab import SOURCE_SPLITS, prepare_vtab, unusual_counts

HELP = "prepare datasets: a VTAB-1k task from a per-split dump into the layout 'tokentune train' reads"
DESCRIPTION = ("prepare-vtab SRC --task NAME --out ROOT writes ROOT/NAME/images/<split>/*, ROOT/NAME/<split>.txt for "
               "train800, val200, test and train800val200, from SRC/<split>/<class>/* image folders or a Hugging Face "
               "DatasetDict saved with save_to_disk.")


def _splits(text: str):
    try:
        pairs = [item.split("=", 1) for item in text.split(",") if item]
        return {k.strip(): v.strip() for k, v in pairs}
    except ValueError:
        raise argparse.ArgumentTypeError(f"--splits: write LAYOUT=SOURCE pairs, e.g. val200=validation; got {text!r}") \
            from None


def add(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_kind", metavar="ACTION")
    p = sub.add_parser("prepare-vtab", help="a VTAB-1k task from per-split image folders or a saved DatasetDict",
                       description=DESCRIPTION)
    p.add_argument("source", metavar="SRC", help="SRC/<split>/<class>/*.jpg, or a DatasetDict folder (save_to_disk)")
    p.add_argument("--task", required=True, metavar="NAME", help="the VTAB-1k task (cifar, dtd, ...; aliases accepted)")
    p.add_argument("--out", required=True, metavar="ROOT", help="the VTAB-1k root to write the task folder into")
    p.add_argument("--splits", type=_splits, default=None, metavar="LAYOUT=SOURCE,...",
                   help=f"source split names other than {', '.join(SOURCE_SPLITS)}, e.g. val200=validation")
    p.add_argument("--image-key", default=None, metavar="NAME", help="image column of a DatasetDict [default: found]")
    p.add_argument("--label-key", default=None, metavar="NAME", help="label column of a DatasetDict [default: found]")


def run(args: argparse.Namespace) -> int:
    if getattr(args, "data_kind", None) != "prepare-vtab":
        raise TokenTuneError("name an action: tokentune data prepare-vtab SRC --task NAME --out ROOT")
    counts = prepare_vtab(args.source, args.out, args.task, splits=args.splits, image_key=args.image_key,
                          label_key=args.label_key)
    print(f"wrote {args.out}: " + ", ".join(f"{split} {n}" for split, n in counts.items()))
    for note in unusual_counts(counts):
        print(f"note: {note}")
    return 0

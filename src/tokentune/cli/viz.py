"""``tokentune viz``: merged tokens, dispatched (DyT) tokens and rates, accuracy versus speed."""
from __future__ import annotations

import argparse
from typing import Dict, List, Optional, Sequence, Tuple

from ..errors import TokenTuneError
from ..tools.export import open_model
from ..tools.viz import (
    X_AXES,
    dyt_activation,
    expand_images,
    plot_activated_tokens,
    plot_activation_rates,
    plot_merged_tokens,
    plot_tradeoff,
)
from .options import parse_pretrained

HELP = "pictures: merged tokens, DyT activated tokens and rates, accuracy vs speed"
DESCRIPTION = ("merge: which patches ToMe/PYRA merged, at several depths; dyt-tokens: the patches each DyT layer "
               "activates; dyt-rates: DyT activation rate per layer; tradeoff: accuracy versus throughput or FLOPs "
               "across methods. Needs matplotlib (pip install 'tokentune[viz]').")


def _floats(text: str) -> Tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise TokenTuneError(f"expected comma-separated numbers like 0.5,0.5,0.5, got {text!r}") from None


def _ints(text: str) -> List[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise TokenTuneError(f"expected comma-separated block numbers like 3,6,9,12, got {text!r}") from None


def _renames(pairs: Optional[Sequence[str]]) -> Dict[str, str]:
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise TokenTuneError(f"--rename expects OLD=NEW, got {pair!r}")
        old, new = pair.split("=", 1)
        out[old.strip()] = new.strip()
    return out


def _add_model_image_args(p, what: str) -> None:
    p.add_argument("model", metavar="MODEL_DIR", help="a run directory ('tokentune train') or an export directory")
    p.add_argument("images", nargs="+", metavar="IMAGE", help=f"image files or folders of images {what}")
    p.add_argument("--out", required=True, metavar="FILE", help="picture to write (.png, .pdf, .svg)")
    p.add_argument("--mean", type=_floats, default=None, metavar="R,G,B",
                   help="input normalisation mean [default: as the model was trained]")
    p.add_argument("--std", type=_floats, default=None, metavar="R,G,B",
                   help="input normalisation std [default: as the model was trained]")
    p.add_argument("--pretrained", type=parse_pretrained, default=None, metavar="hub|PATH",
                   help="for a run directory: where the frozen backbone comes from [default: as recorded]")
    p.add_argument("--dpi", type=int, default=100, metavar="N", help="resolution [default: 100]")


def add(parser: argparse.ArgumentParser) -> None:
    """Options of ``tokentune viz {merge,tradeoff,dyt-tokens,dyt-rates} ...``."""
    sub = parser.add_subparsers(dest="viz_kind", metavar="PICTURE")
    sub.required = True
    m = sub.add_parser("merge", help="which patches were merged into one token (ToMe/PYRA), at several depths",
                       description="Run the model on each image with source tracing on and draw every merged group "
                                   "in the mean colour of its pixels with its borders (the ToMe paper's figure).")
    _add_model_image_args(m, "(one row each; resized to the model's input size, no crop)")
    m.add_argument("--max-images", type=int, default=8, metavar="N", help="at most N images (rows) [default: 8]")
    m.add_argument("--depths", type=_ints, default=None, metavar="D,D,...",
                   help="after how many blocks to draw, e.g. 3,6,9,12 [default: up to 4 spread over the merging blocks]")
    m.add_argument("--style", choices=["mean", "random"], default="mean",
                   help="mean: each group in its mean colour (ToMe paper); random: random colours over the image")
    d = sub.add_parser("dyt-tokens", help="which patches a DyT model activates in each layer, over each image",
                       description="Draw every image with the patches each DyT dispatcher skips dimmed (the DyT "
                                   "paper's Fig. 6). With DyT+ToMe a patch shows its merged token's decision.")
    _add_model_image_args(d, "(one row each)")
    d.add_argument("--max-images", type=int, default=8, metavar="N", help="at most N images (rows) [default: 8]")
    d.add_argument("--layers", type=_ints, default=None, metavar="I,I,...",
                   help="dispatchers to draw, 0-based positions (one per block for MLP Dispatch) [default: up to 6]")
    r = sub.add_parser("dyt-rates", help="DyT activation rate per layer and overall, over a set of images",
                       description="Bar chart of the share of patch tokens each DyT dispatcher activates, and overall "
                                   "(the DyT paper's Fig. 5), over the given images.")
    _add_model_image_args(r, "(all are used)")
    r.add_argument("--max-images", type=int, default=None, metavar="N", help="use at most N images [default: all]")
    r.add_argument("--title", default=None, help="figure title")
    t = sub.add_parser("tradeoff", help="accuracy versus throughput or FLOPs across methods",
                       description="Join accuracy from run results (results.json, summaries) with throughput/FLOPs "
                                   "from benchmark tables (bench JSON) by method label and plot them.")
    t.add_argument("paths", nargs="+", metavar="PATH", help="run directories, results.json files, bench/summary JSON files")
    t.add_argument("--out", required=True, metavar="FILE", help="picture to write (.png, .pdf, .svg)")
    t.add_argument("--x", choices=sorted(X_AXES), default="throughput",
                   help="x axis: throughput (images/s), gmacs (the papers' GFLOPs) or gflops [default: throughput]")
    t.add_argument("--metric", choices=["top1", "best"], default="top1",
                   help="run accuracy: top1 after the last epoch, or best over epochs (optimistic) [default: top1]")
    t.add_argument("--rename", action="append", metavar="OLD=NEW",
                   help="rename a label so rows of different files join (repeatable)")
    t.add_argument("--title", default=None, help="figure title")
    t.add_argument("--no-frontier", action="store_true", help="do not draw the Pareto front")
    t.add_argument("--dpi", type=int, default=100, metavar="N", help="resolution [default: 100]")


def run(args: argparse.Namespace) -> int:
    """``tokentune viz``: draw the picture asked for."""
    if args.viz_kind == "merge":
        model = open_model(args.model, pretrained=args.pretrained)
        path = plot_merged_tokens(model, expand_images(args.images, args.max_images), args.out, depths=args.depths,
                                  style=args.style, mean=args.mean, std=args.std, dpi=args.dpi)
    elif args.viz_kind == "dyt-tokens":
        model = open_model(args.model, pretrained=args.pretrained)
        path = plot_activated_tokens(model, expand_images(args.images, args.max_images), args.out, layers=args.layers,
                                     mean=args.mean, std=args.std, dpi=args.dpi)
    elif args.viz_kind == "dyt-rates":
        model = open_model(args.model, pretrained=args.pretrained)
        stats, _ = dyt_activation(model, expand_images(args.images, args.max_images), mean=args.mean, std=args.std,
                                  keep_pixels=False)
        path = plot_activation_rates(stats, args.out, title=args.title, dpi=args.dpi)
        print(stats.summary())
    elif args.viz_kind == "tradeoff":
        metric = "best_top1_over_epochs" if args.metric == "best" else "top1"
        path = plot_tradeoff(args.paths, args.out, x=args.x, rename=_renames(args.rename), metric=metric,
                             title=args.title, frontier=not args.no_frontier, dpi=args.dpi)
    else:   # argparse only lets registered pictures through
        raise TokenTuneError(f"unknown picture {args.viz_kind!r}")
    print(f"wrote {path}")
    return 0

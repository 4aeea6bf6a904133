"""``tokentune accelerate``: find the training-free token reduction that makes a trained model reach
a speed target on your validation data and this machine with the least accuracy lost, and export
it (:mod:`tokentune.tools.accelerate`)."""
from __future__ import annotations

import argparse
import os

from ..engine.checkpoint import read_config
from ..engine.data import check_images, image_folder_dataset, skipped_summary, vtab_dataset
from ..engine.rundir import RunDir
from ..errors import TokenTuneError
from ..tools.accelerate import DTYPES, AccelerateConfig, accelerate
from .options import add_data_options, parse_pretrained

HELP = "make a trained model fast: search training-free token reduction for a speed target on your data"
DESCRIPTION = (
    "Every registered training-free method (ToMe, EViT, ...) is tried on SOURCE: its schedule is set by FLOPs, then "
    "refined by timing it side by side with the unmodified model at --batch-size and --dtype on this machine; the "
    "most accurate candidate within the target on the validation data is exported to --out (load it with "
    "tokentune.open_model), with a table, an accuracy/speed picture and a JSON record of everything measured. A "
    "model that already reduces tokens (PYRA, a ToMe run) keeps its reducer; only its schedule is searched. The "
    "search is resumable: run the same command again and it continues.")


def add(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="SOURCE",
                        help="a run or export directory, a peft adapter directory, hf-hub:/local-dir: locations of "
                             "those, or a timm model name (with --pretrained)")
    target = parser.add_argument_group("target (one of)")
    target.add_argument("--target-speedup", type=float, metavar="S", help="measured throughput over the unmodified model")
    target.add_argument("--target-gmacs", type=float, metavar="G", help="at most G GMACs (multiply-adds) per image")
    target.add_argument("--target-share", type=float, metavar="F", help="at most this share of the model's FLOPs (0.6)")
    parser.add_argument("--out", metavar="DIR", default=None, help="directory for the chosen model's export, the table, "
                        "the picture, the record and the search state (rerun to continue a stopped search)")
    parser.add_argument("--pretrained", type=parse_pretrained, default=None, metavar="hub|PATH|none",
                        help="frozen backbone weights of a timm name or a run [default: hub for a timm name, as "
                             "recorded for a run]")
    parser.add_argument("--base-model", metavar="NAME", default=None,
                        help="timm name of a peft adapter's base model [default: as the adapter records it]")
    add_data_options(parser)
    parser.add_argument("--split", default=None, metavar="SPLIT", help="validation split [default: test (image "
                        "folders fall back to val)]")
    parser.add_argument("--batch-size", type=int, default=256, metavar="N", help="images per timed forward [default: 256]")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="timing and evaluation precision")
    parser.add_argument("--methods", default=None, metavar="A,B",
                        help="candidate methods [default: every training-free method with a schedule option]")
    parser.add_argument("--max-drop", type=float, default=None, metavar="POINTS",
                        help="top-1 points the choice may lose [default: any]")
    parser.add_argument("--finetune-epochs", type=int, default=0, metavar="N",
                        help="when the drop exceeds --max-drop: N epochs of PEFT recovery on --train-data")
    parser.add_argument("--train-data", default=None, metavar="SPLIT|DIR",
                        help="recovery training data: a split of the validation source (train) or an image folder")
    parser.add_argument("--finetune-lr", type=float, default=None, metavar="LR", help="recovery learning rate")
    parser.add_argument("--onnx", action="store_true", help="also write DIR/model.onnx of the chosen model")
    g = parser.add_argument_group("search")
    g.add_argument("--rounds", type=int, default=5, metavar="N", help="interleaved timing rounds per candidate, at most")
    g.add_argument("--min-rounds", type=int, default=3, metavar="N",
                   help="rounds at least: then they stop once the candidate's speed-up agrees within the tolerance")
    g.add_argument("--min-block-s", type=float, default=1.0, metavar="S",
                   help="each timing round runs enough forwards of a model to last S seconds (0: one forward)")
    g.add_argument("--max-trials", type=int, default=4, metavar="N", help="schedules timed per method at most")
    g.add_argument("--evaluate", default="gentlest", metavar="{gentlest,within}",
                   help="which timed schedules get a validation pass: the gentlest within the target, one per "
                        "method (each other one costs a full pass and removes more tokens), or every one within "
                        "the target [default: gentlest]")
    g.add_argument("--val-images", type=int, default=None, metavar="N", help="a seeded subset of N validation images")
    g.add_argument("--eval-batch-size", type=int, default=None, metavar="N",
                   help="evaluation batch size [default: 32 on the CPU (faster per image there than 256), 256 on a GPU]")
    g.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads [default: torch's]")
    g.add_argument("--device", default="cpu", metavar="DEV", help="cpu, cuda, cuda:N [default: cpu]")
    g.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the subset and the recovery")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _target(args: argparse.Namespace) -> str:
    given = [(k, v) for k, v in (("speedup", args.target_speedup), ("gmacs", args.target_gmacs),
                                 ("share", args.target_share)) if v is not None]
    if len(given) != 1:
        raise TokenTuneError("give one target: --target-speedup S, --target-gmacs G or --target-share F")
    return f"{given[0][0]}:{given[0][1]}"


def _recorded_data(source: str) -> dict:
    """The data options a run directory records (validating on its data when none are given)."""
    if not os.path.isdir(source) or not RunDir(source).is_run():
        return {}
    config = read_config(source)
    cli = (config.get("run") or {}).get("cli") or {}
    info = config.get("data") or {}
    folder = cli.get("image_folder") or (info.get("root") if info.get("kind") == "folder" else None)
    return {"image_folder": folder, "data": cli.get("data") or info.get("root"), "dataset": cli.get("dataset") or
            info.get("name")}


def _dataset(args: argparse.Namespace, split: str, classes=None):
    recorded = {} if (args.image_folder or args.data or args.dataset) else _recorded_data(args.source)
    folder = args.image_folder or recorded.get("image_folder")
    if folder:
        if classes is None and os.path.isdir(os.path.join(folder, "train")):
            classes = image_folder_dataset(folder, "train").classes      # the label order of training
        return image_folder_dataset(folder, split, classes=classes)
    name, root = args.dataset or recorded.get("dataset"), args.data or recorded.get("data")
    if not name or not root:
        raise TokenTuneError("name the validation data: --image-folder DIR, or --data ROOT --dataset NAME")
    return vtab_dataset(root, name, split, check_files=False)


def run(args: argparse.Namespace) -> int:
    target = _target(args)
    if not args.out:
        raise TokenTuneError("name the output directory: --out DIR (the chosen model's export, table and record)")
    cfg = AccelerateConfig(batch_size=args.batch_size, dtype=args.dtype,
                           methods=[m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None,
                           max_drop=args.max_drop, rounds=args.rounds, min_rounds=args.min_rounds,
                           min_block_s=args.min_block_s,
                           max_trials=args.max_trials, evaluate=args.evaluate,
                           eval_batch_size=args.eval_batch_size, val_images=args.val_images, seed=args.seed,
                           device=args.device, threads=args.threads, finetune_epochs=args.finetune_epochs,
                           finetune_lr=args.finetune_lr, onnx=args.onnx, progress=False if args.no_progress else None)
    val = _dataset(args, args.split or "test")
    train = None
    if args.train_data:
        train = (image_folder_dataset(args.train_data, "train", classes=getattr(val, "classes", None))
                 if os.path.isdir(args.train_data) else _dataset(args, args.train_data, getattr(val, "classes", None)))
    elif args.finetune_epochs:
        raise TokenTuneError("--finetune-epochs needs --train-data (a split of the validation source, or an image folder)")
    datasets = [val] + ([train] if train is not None else [])
    check_images(datasets, args.skip_bad_images, progress=False if args.no_progress else None)
    skipped = skipped_summary(datasets)
    if skipped:
        print(skipped)
    accelerate(args.source, val, target, args.out, train_data=train, pretrained=args.pretrained,
               base_model=args.base_model, config=cfg)
    return 0

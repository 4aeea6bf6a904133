"""``tokentune eval``: rebuild the trained model of a run directory and report top-1 on a split."""
from __future__ import annotations

import argparse
import os

from ..core.deploy import deploy
from ..core.task import task_of
from ..core.vit import spec_of
from ..engine import distributed as D
from ..engine.checkpoint import load_trained, read_config
from ..engine.config import TrainConfig
from ..engine.data import check_images, image_folder_dataset, set_transforms, skipped_summary, vtab_dataset
from ..engine.training import evaluator_of
from ..errors import TokenTuneError
from ..fileio import atomic_write_json
from .options import add_data_options, parse_pretrained

HELP = "evaluate a run directory on a split"
DESCRIPTION = ("Rebuild the trained model of a run directory and report top-1 on a split (a task's metric for a "
               "task's run: mIoU and pixel accuracy for segmentation).")


def add(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN_DIR", help="a run directory written by 'tokentune train' (or save_trained)")
    parser.add_argument("--split", default=None, metavar="SPLIT",
                        help="split to evaluate [default: the run's test split, e.g. test]")
    parser.add_argument("--pretrained", type=parse_pretrained, default=None, metavar="hub|PATH|none",
                        help="where the frozen backbone weights come from [default: as recorded in the run]")
    add_data_options(parser)
    parser.add_argument("--batch-size", type=int, default=256, metavar="N", help="evaluation batch size [default: 256]")
    parser.add_argument("--device", default=None, metavar="DEV", help="auto, cpu, cuda, cuda:N [default: auto]")
    parser.add_argument("--amp", default=None, choices=["auto", "off", "bf16", "fp16"],
                        help="autocast precision [default: the run's]")
    parser.add_argument("--num-workers", type=int, default=2, metavar="N", help="data-loading processes [default: 2]")
    parser.add_argument("--deploy", action="store_true",
                        help="evaluate the deployed model (LoRA merged, method deploy hooks applied)")
    parser.add_argument("--add-method", action="append", default=None, metavar="NAME[:FIELD=VALUE,...]",
                        help="add a training-free method to the trained model, off the shelf (e.g. "
                             "pitome:pitome_r=0.9, tome:r=flops:2.0); repeat or join with '+' [default: none]")
    parser.add_argument("--json", metavar="FILE", default=None, help="also write the result as JSON to FILE")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    config = read_config(args.run)
    cli = (config.get("run") or {}).get("cli") or {}
    train_cfg = config.get("train_config") or {}
    data_info = config.get("data") or {}
    split = args.split or train_cfg.get("test_split", "test")
    inf = D.init_distributed(args.device)
    try:
        dev = D.resolve_device(args.device)
        model = load_trained(args.run, pretrained=args.pretrained, add_method=args.add_method)
        model_method = (spec_of(model) or {}).get("method")
        task = task_of(model)
        if task is not None:
            ds = _task_split(task, args, cli, train_cfg, config, split, model)
        recorded_folder = cli.get("image_folder") or (data_info.get("root") if data_info.get("kind") == "folder" else None)
        if task is not None:
            pass
        elif args.image_folder or (not args.dataset and recorded_folder):
            folder = args.image_folder or recorded_folder
            train_split = train_cfg.get("train_split", "train")
            classes = image_folder_dataset(folder, train_split).classes
            ds = image_folder_dataset(folder, split, classes=classes)
        else:
            name = args.dataset or cli.get("dataset") or data_info.get("name")
            root = args.data or cli.get("data") or data_info.get("root")
            if not name or not root:
                raise TokenTuneError(f"{args.run} does not record its dataset; pass --data ROOT --dataset NAME or "
                                     "--image-folder DIR")
            ds = vtab_dataset(root, name, split, check_files=False)   # check_images reports missing files
        if task is None:
            check_images([ds], args.skip_bad_images, progress=False if args.no_progress else None)
        skipped = skipped_summary([ds])
        if skipped and inf.is_main:
            print(skipped + (f" (all of them are listed in {args.json})" if args.json else ""))
        if task is None and ds.num_classes > model.num_classes:
            raise TokenTuneError(f"{ds.name} has {ds.num_classes} classes but the model's head has {model.num_classes}")
        if task is None:
            set_transforms([ds], model, train_cfg.get("image_size"), train_cfg.get("normalization", "auto"),
                           train_cfg.get("interpolation", "bicubic"))
        model.to(dev)
        if args.deploy:
            model = deploy(model)
        evaluate_fn, metric = evaluator_of(model)
        metrics = evaluate_fn(model, ds, batch_size=args.batch_size, device=dev,
                              amp=args.amp or train_cfg.get("amp", "auto"), num_workers=args.num_workers,
                              progress=False if args.no_progress else None)
    finally:
        D.shutdown()
    record = {"run": os.path.abspath(args.run), "dataset": ds.name, "split": ds.split, "deployed": args.deploy,
              "method": config.get("method"), "model": config.get("model"),
              "evaluated_method": model_method, "added": args.add_method or [], **metrics, "skipped": ds.skipped}
    added = f" [{model_method}]" if args.add_method else ""
    if inf.is_main:
        if metric == "top1":
            print(f"{ds.name} {ds.split}: top-1 {metrics['top1']:.2f}% ({metrics['correct']}/{metrics['total']})"
                  f"{' [deployed]' if args.deploy else ''}{added}")
        else:
            others = "".join(f", {k} {v:.2f}%" for k, v in metrics.items() if k in ("pixel_acc", "macc"))
            print(f"{ds.name} {ds.split}: {metric} {metrics[metric]:.2f}%{others}{' [deployed]' if args.deploy else ''}{added}")
        if args.json:
            atomic_write_json(args.json, record)
    return 0


def _task_split(task, args, cli, train_cfg, config, split, model):
    """The evaluated split of a task's run (its data options as recorded unless given), with the task's
    evaluation transform."""
    _, ds = task.load_data(data_root=args.data or (None if args.image_folder else cli.get("data")),
                           dataset=args.dataset or (None if args.image_folder else cli.get("dataset")),
                           image_folder=args.image_folder or (None if args.data else cli.get("image_folder")),
                           train_split=None, test_split=split, num_classes=config.get("num_classes"),
                           skip_bad_images=args.skip_bad_images, progress=False if args.no_progress else None,
                           options=config.get("task_config"))
    task.set_transforms(None, ds, model, TrainConfig(normalization=train_cfg.get("normalization", "auto"),
                                                     image_size=train_cfg.get("image_size")))
    if task.describe is not None:
        print(task.describe(None, ds, model))
    return ds

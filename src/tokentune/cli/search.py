"""``tokentune search METHOD``: find a method's options on data before training (DiffRate's prune and
merge counts under a FLOPs target), starting from a trained run, and write them to a file that
``tokentune train --<method>-<option> FILE`` reads (the methods with a ``search`` hook)."""
from __future__ import annotations

import argparse
import os

from ..core.method import available_methods, get_method
from ..engine import distributed as D
from ..engine.checkpoint import load_trained, read_config
from ..engine.data import check_images, image_folder_dataset, set_transforms, skipped_summary, vtab_dataset
from ..errors import TokenTuneError
from ..fileio import atomic_write_json
from .options import add_data_options, add_dataclass_options, parse_pretrained

HELP = "search a method's options on data before training (diffrate: prune/merge rates under a FLOPs target)"
DESCRIPTION = ("Start from a trained run whose head knows the data's labels (e.g. 'tokentune train --method lora'), "
               "search the method's options on the training split of the data (the run's, or --data/--dataset/"
               "--image-folder) and write them to --out, a file 'tokentune train --method ...+METHOD "
               "--METHOD-OPTION FILE' reads. The search is resumable: it checkpoints after every epoch to --checkpoint "
               "and the same command continues it.")


def searchable() -> list:
    """Registered methods with a ``search`` hook."""
    return [n for n in available_methods() if get_method(n).search is not None]


def add(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="search_method", metavar="METHOD")
    sub.required = True
    for name in searchable():
        method = get_method(name)
        p = sub.add_parser(name, help=method.summary.replace("%", "%%"), description=DESCRIPTION)
        p.add_argument("run", metavar="RUN_DIR", help="a run directory of 'tokentune train' whose head knows the labels")
        p.add_argument("--out", metavar="FILE", default=None,
                       help=f"JSON file to write (read back by 'tokentune train --{name}-"
                            f"{method.search_option.replace('_', '-')} FILE')")
        p.add_argument("--checkpoint", metavar="FILE", default=None,
                       help="search state after every epoch; an existing one is continued [default: --out + '.search.pt'; "
                            "delete it to search afresh]")
        p.add_argument("--pretrained", type=parse_pretrained, default=None, metavar="hub|PATH|none",
                       help="where the run's frozen backbone weights come from [default: as recorded in the run]")
        add_data_options(p)
        p.add_argument("--split", default=None, metavar="SPLIT",
                       help="split to search on [default: the run's training split, e.g. train800val200]")
        p.add_argument("--device", default=None, metavar="DEV", help="auto, cpu, cuda, cuda:N [default: auto]")
        p.add_argument("--no-progress", action="store_true", help="no progress bar while checking images")
        g = p.add_argument_group(f"{name} search options")
        add_dataclass_options(g, method.search_config, "", "s__")


def _dataset(args: argparse.Namespace, config: dict):
    """The split to search on: the data options given, else the data the run was trained on."""
    cli = (config.get("run") or {}).get("cli") or {}
    train_cfg = config.get("train_config") or {}
    data_info = config.get("data") or {}
    split = args.split or train_cfg.get("train_split", "train800val200")
    recorded_folder = cli.get("image_folder") or (data_info.get("root") if data_info.get("kind") == "folder" else None)
    if args.image_folder or (not args.dataset and not args.data and recorded_folder):
        folder = args.image_folder or recorded_folder
        return image_folder_dataset(folder, args.split or train_cfg.get("train_split", "train"))
    name = args.dataset or cli.get("dataset") or data_info.get("name")
    root = args.data or cli.get("data") or data_info.get("root")
    if not name or not root:
        raise TokenTuneError(f"{args.run} does not record its dataset; pass --data ROOT --dataset NAME or "
                             "--image-folder DIR")
    return vtab_dataset(root, name, split, check_files=False)     # check_images reports missing files


def run(args: argparse.Namespace) -> int:
    method = get_method(args.search_method)
    cfg = method.search_config(**{k[3:]: v for k, v in vars(args).items() if k.startswith("s__")})
    if not args.out:
        raise TokenTuneError(f"name the file to write the found options to: --out FILE (e.g. {method.name}-rates.json)")
    if os.path.isdir(args.out):
        raise TokenTuneError(f"--out {args.out!r} is a directory; name the file to write, e.g. {args.out}/rates.json")
    config = read_config(args.run)
    if config.get("task"):
        raise TokenTuneError(f"{args.run} is a {config['task']} run; the search needs an image classification run")
    checkpoint = args.checkpoint or args.out + ".search.pt"
    dev = D.resolve_device(args.device)
    model = load_trained(args.run, pretrained=args.pretrained)
    ds = _dataset(args, config)
    check_images([ds], args.skip_bad_images, progress=False if args.no_progress else None)
    skipped = skipped_summary([ds])
    if skipped:
        print(skipped)
    if ds.num_classes > model.num_classes:
        raise TokenTuneError(f"{ds.name} has {ds.num_classes} classes but the run's head has {model.num_classes}; "
                             "search on the data the run was trained on")
    train_cfg = config.get("train_config") or {}
    set_transforms([ds], model, train_cfg.get("image_size"), train_cfg.get("normalization", "auto"),
                   train_cfg.get("interpolation", "bicubic"))
    resumed = os.path.isfile(checkpoint)
    print(f"{method.name} search on {ds.name} {ds.split} ({len(ds)} images) from {args.run}; checkpoint {checkpoint}"
          + (" (continued)" if resumed else ""))
    record = method.search(model.to(dev), ds, cfg, checkpoint=checkpoint, log=print)
    record.update(run=os.path.abspath(args.run), dataset=ds.name, split=ds.split, skipped=ds.skipped)
    atomic_write_json(args.out, record)
    option = f"--{method.name}-{method.search_option.replace('_', '-')}"
    measured = "".join(f", {k} {record[k]:.4g}" for k in ("gmacs", "target_gmacs", "unreduced_gmacs") if k in record)
    print(f"wrote {args.out}: {', '.join(f'{k} {v}' for k, v in record['options'].items())}{measured}")
    print(f"train with: tokentune train --method {config.get('method')}+{method.name} {option} {args.out} ...")
    return 0

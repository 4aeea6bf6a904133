"""``tokentune train``: fine-tune a ViT with a method on VTAB-1k or an image folder."""
from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any, Dict

from ..core.factory import check_model_options, create_model
from ..core.method import available_methods, available_recipes, get_method, get_recipe
from ..core.params import count_parameters
from ..core.task import available_tasks, get_task
from ..engine import distributed as D
from ..engine.checkpoint import read_config
from ..engine.config import TrainConfig
from ..engine.data import load_datasets, set_transforms, skipped_summary
from ..engine.rundir import CONFIG_NAME, RunDir
from ..engine.training import train, validate_config
from ..errors import TokenTuneError
from .options import (
    DEFAULT_MODEL,
    add_data_options,
    add_dataclass_options,
    add_method_options,
    add_task_options,
    parse_bool,
    parse_pretrained,
    timm_kwarg,
)

HELP = "fine-tune a ViT with a method on VTAB-1k, an image folder, or a task's data (segmentation, video)"
DESCRIPTION = ("Train, evaluate after the 1st epoch, every --eval-every epochs and at the end, and write a "
               "run directory (checkpoint after every epoch; --resume continues an interrupted run). "
               "Multi-GPU: torchrun --nproc_per_node N -m tokentune train ... "
               "Value syntax: lists are comma-separated (--tome-r 16,16,10, with repetition: 16x11,10); a "
               "tuple such as ToMe's (r, inflect) is written as in Python with the float's decimal point "
               "(--tome-r 16,-1.0); booleans are true/false (a bare flag means true); 'none' clears an "
               "optional value; dictionaries are JSON (--param-groups '{\"blocks\\\\.0\\\\.\": {\"lr\": 0}}').")


def add(parser: argparse.ArgumentParser) -> None:

    g = parser.add_argument_group("model")
    g.add_argument("--model", metavar="NAME", default=argparse.SUPPRESS,
                   help=f"timm ViT name [default: {DEFAULT_MODEL}, the ImageNet-21k ViT-B/16 of the VTAB-1k papers]")
    g.add_argument("--method", metavar="SPEC", default=argparse.SUPPRESS,
                   help="method spec, methods joined by '+': e.g. lora, lora+tome, adapter, full, linear, pyra, dyt "
                        "(see the option groups below) [default: lora]")
    g.add_argument("--pretrained", type=parse_pretrained, metavar="hub|PATH|none", default=argparse.SUPPRESS,
                   help="backbone weights: 'hub' (timm hub, needs internet once; offline and not cached it fails at "
                        "once), a local .npz/.pth/.safetensors file (e.g. Google's ViT-B_16.npz), or 'none' (random "
                        "init) [default: hub]")
    g.add_argument("--num-classes", type=int, metavar="N", default=argparse.SUPPRESS,
                   help="classes of the new head [default: the dataset's]")
    g.add_argument("--head-init-std", type=float, metavar="STD", default=argparse.SUPPRESS,
                   help="re-initialise the head with trunc_normal(STD) weights and zero bias (DyT: 0.01) "
                        "[default: timm's initialisation]")
    g.add_argument("--train-head", type=parse_bool, metavar="BOOL", default=argparse.SUPPRESS,
                   help="train the classification head [default: true]")
    g.add_argument("--pretrained-head", type=parse_bool, metavar="BOOL", default=argparse.SUPPRESS,
                   help="keep the checkpoint's classification head when it has as many classes as the task (e.g. "
                        "continuing on the checkpoint's own classes) [default: false, a new head]")
    g.add_argument("--drop-path-rate", type=float, metavar="P", default=argparse.SUPPRESS,
                   help="stochastic depth rate of the backbone (PYRA: 0.1) [default: 0]")
    g.add_argument("--timm", type=timm_kwarg, action="append", metavar="KEY=VALUE", default=argparse.SUPPRESS,
                   help="any other timm.create_model keyword, repeatable (e.g. --timm drop_rate=0.1)")
    recipes = available_recipes()
    g.add_argument("--recipe", metavar="NAME", default=argparse.SUPPRESS,
                   help="a paper's model and training options as defaults (explicit options win); available: "
                        + (", ".join(f"{n} ({r.summary})" if r.summary else n for n, r in sorted(recipes.items()))
                           or "none registered").replace("%", "%%"))
    add_data_options(parser)
    add_task_options(parser)
    g = parser.add_argument_group("run")
    g.add_argument("--out", metavar="DIR", default=argparse.SUPPRESS,
                   help="run directory for checkpoints and results [default: runs/<dataset>-<method>]")
    g.add_argument("--resume", action="store_true",
                   help="continue the interrupted run in --out exactly (its recorded options are the defaults; "
                        "--epochs may be raised to extend a run)")
    g.add_argument("--restart-from-weights", action="store_true",
                   help="continue the run in --out from its saved weights and history when its resume.pt is lost or "
                        "corrupt (optimizer and random state start afresh: not bit-identical)")
    g.add_argument("--device", metavar="DEV", default=argparse.SUPPRESS,
                   help="auto, cpu, cuda or cuda:N [default: auto = GPU if available]; under torchrun each "
                        "process takes cuda:LOCAL_RANK")
    g.add_argument("--max-steps", type=int, metavar="N", default=argparse.SUPPRESS,
                   help="stop after N optimizer steps in total, saving the state (continue with --resume)")
    g.add_argument("--eval-batch-size", type=int, metavar="N", default=argparse.SUPPRESS,
                   help="evaluation batch size [default: 2 x --batch-size]")
    g.add_argument("--label", metavar="TEXT", default=argparse.SUPPRESS,
                   help="row label of this run in 'tokentune summarize' [default: the method]")
    g.add_argument("--no-progress", action="store_true", help="no progress bars (they show only on a terminal anyway)")
    g = parser.add_argument_group("training options (tokentune.config.TrainConfig)")
    add_dataclass_options(g, TrainConfig, "", "t__")
    add_method_options(parser)


def _explicit(args) -> Dict[str, Any]:
    return {k: v for k, v in vars(args).items() if not k.startswith("_")}


def _resolve_train_options(args) -> Dict[str, Any]:
    """Merge (lowest to highest): built-in defaults, the resumed run's options, the recipe, explicit options."""

    given = _explicit(args)
    opts: Dict[str, Any] = {"model": DEFAULT_MODEL, "method": "lora", "pretrained": True, "num_classes": None,
                            "head_init_std": None, "train_head": True, "pretrained_head": False, "model_options": {}, "train": {},
                            "data": None, "dataset": None, "image_folder": None, "recipe": None,
                            "skip_bad_images": False, "task": None}
    out = given.get("out")
    if (given.get("resume") or given.get("restart_from_weights")) and out and os.path.isfile(os.path.join(out, CONFIG_NAME)):
        saved = (read_config(out).get("run") or {}).get("cli")
        if saved:   # the interrupted run's options (recipe already applied) become the defaults
            opts.update({k: v for k, v in saved.items() if k in opts})
    elif (given.get("resume") or given.get("restart_from_weights")) and out and os.path.isdir(out) and not any(
            given.get(k) for k in ("data", "image_folder")):
        raise TokenTuneError(f"cannot resume {out}: its {CONFIG_NAME}, which records the run's options, is missing; "
                             "pass the run's options again with --resume (--data/--dataset or --image-folder, --model, "
                             "--method, ...)")
    recipe_name = given.get("recipe")
    if recipe_name:
        recipe = get_recipe(recipe_name)
        opts["recipe"] = recipe.name
        opts["method"] = recipe.method
        for k, v in recipe.model_options.items():
            if k in ("model", "pretrained", "num_classes", "head_init_std", "train_head", "pretrained_head", "task"):
                opts[k] = v
            else:
                opts["model_options"][k] = v
        train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
        bad = sorted(set(recipe.train_options) - train_fields)
        if bad:
            raise TokenTuneError(f"recipe {recipe.name!r} sets unknown training option(s) {', '.join(bad)}")
        opts["train"].update(recipe.train_options)
    for k in ("model", "method", "pretrained", "num_classes", "head_init_std", "train_head", "pretrained_head", "data",
              "dataset", "image_folder", "task"):
        if k in given and given[k] is not None:
            opts[k] = given[k]
    if given.get("skip_bad_images"):         # a bare flag: without it a resumed run keeps its recorded choice
        opts["skip_bad_images"] = True
    if isinstance(opts["pretrained"], str):   # recorded in the run: keep it valid from any directory
        opts["pretrained"] = os.path.abspath(os.path.expanduser(opts["pretrained"]))
    if "drop_path_rate" in given:
        opts["model_options"]["drop_path_rate"] = given["drop_path_rate"]
    for key, value in given.get("timm", []) or []:
        opts["model_options"][key] = value
    for k, v in given.items():
        if k.startswith("t__"):
            opts["train"][k[3:]] = v
        elif k.startswith("m__") or k.startswith("k__"):     # a method's or a task's option
            _, owner, field = k.split("__", 2)
            opts["model_options"][f"{owner}_{field}"] = v
    for name in available_methods():      # a file of searched options (--diffrate-rates): valid from any directory
        option = get_method(name).search_option
        key = f"{name}_{option}" if option else None
        if key and isinstance(opts["model_options"].get(key), str):
            opts["model_options"][key] = os.path.abspath(os.path.expanduser(opts["model_options"][key]))
    if opts["task"] == "classification":
        opts["task"] = None
    task = opts["task"]
    stray = sorted({t for t in available_tasks() for k in opts["model_options"] if k.startswith(t + "_") and t != task})
    if stray:
        raise TokenTuneError(f"--{stray[0]}-... options need --task {stray[0]}")
    return opts


def head_line(opts: Dict[str, Any], num_classes: int) -> str:
    """Which head the run starts from: a new one, or the checkpoint's (``--pretrained-head``)."""
    init = (f"trunc_normal({opts['head_init_std']:g})" if opts.get("head_init_std") is not None
            else "timm's initialisation")
    if not opts["pretrained"]:
        return f"head: new, {num_classes} classes ({init}; random backbone)"
    if opts.get("pretrained_head") and opts.get("head_init_std") is None:
        return (f"head: the checkpoint's where it has {num_classes} classes (--pretrained-head true), else new "
                f"({init})")
    return (f"head: new, {num_classes} classes ({init}), not the checkpoint's; --pretrained-head true keeps a "
            "checkpoint head of as many classes")


def run(args: argparse.Namespace) -> int:

    opts = _resolve_train_options(args)
    cfg = TrainConfig(**{k: (tuple(v) if k == "betas" else v) for k, v in opts["train"].items()})
    validate_config(cfg)
    check_model_options(opts["method"], opts["model_options"])   # before any data is read
    given = _explicit(args)
    inf = D.init_distributed(given.get("device"))
    say = print if inf.is_main else (lambda *a, **k: None)
    task = get_task(opts["task"]) if opts["task"] else None
    load = task.load_data if task is not None else load_datasets
    extra = {"num_classes": opts["num_classes"], "options": opts["model_options"]} if task is not None else {}
    try:
        train_ds, test_ds = load(data_root=opts["data"], dataset=opts["dataset"], image_folder=opts["image_folder"],
                                 train_split=cfg.train_split, test_split=cfg.test_split,
                                 skip_bad_images=opts["skip_bad_images"],
                                 progress=False if given.get("no_progress") else None, **extra)
        skipped = skipped_summary([train_ds, test_ds])
        if skipped:
            say(f"{skipped} (all of them are listed in the run's config.json and results.json)")
        num_classes = opts["num_classes"] or train_ds.num_classes
        if num_classes < train_ds.num_classes:
            raise TokenTuneError(f"--num-classes {num_classes} is smaller than the dataset's {train_ds.num_classes} classes")
        model_options = dict(opts["model_options"])
        if cfg.image_size is not None:
            model_options.setdefault("img_size", cfg.image_size)
        # the training seed initialises the model: every process builds the same new layers
        model = create_model(opts["model"], method=opts["method"], num_classes=num_classes,
                             pretrained=opts["pretrained"], train_head=opts["train_head"],
                             pretrained_head=opts["pretrained_head"], head_init_std=opts["head_init_std"],
                             seed=cfg.seed, task=opts["task"], **model_options)
        if task is not None:
            task.set_transforms(train_ds, test_ds, model, cfg)
        else:
            set_transforms([train_ds, test_ds], model, cfg.image_size, cfg.normalization, cfg.interpolation)
        out = given.get("out") or os.path.join("runs", f"{train_ds.name}-{model.tokentune.spec['method']}")
        c = count_parameters(model)
        say(f"model {opts['model']} method {model.tokentune.spec['method']}: {c['trainable']:,} trainable of "
            f"{c['total']:,} parameters (paper count {c['paper_trainable']:,} = {c['paper_pct']:.3f}% of the backbone)")
        say(f"data {train_ds.name}: {len(train_ds)} training images ({train_ds.split}), {len(test_ds)} test images "
            f"({test_ds.split}), {num_classes} classes; {inf.world_size} process(es); run directory {out}")
        say(head_line(opts, num_classes))
        if task is not None and task.describe is not None:
            say(task.describe(train_ds, test_ds, model))
        cli_record = {k: opts[k] for k in ("model", "method", "pretrained", "num_classes", "head_init_std",
                                           "train_head", "pretrained_head", "data", "dataset", "image_folder", "recipe",
                                           "skip_bad_images", "task")}
        cli_record["data"] = os.path.abspath(opts["data"]) if opts["data"] else None
        cli_record["image_folder"] = os.path.abspath(opts["image_folder"]) if opts["image_folder"] else None
        cli_record.update(model_options=opts["model_options"], train=opts["train"])
        run_info = {"cli": cli_record}
        if "label" in given:
            run_info["label"] = given["label"]
        resume = "weights" if given.get("restart_from_weights") else bool(given.get("resume"))
        result = train(model, train_ds, test_ds, cfg, out_dir=out, resume=resume,
                       device=given.get("device"), max_steps=given.get("max_steps"),
                       progress=False if given.get("no_progress") else None,
                       eval_batch_size=given.get("eval_batch_size"), run_info=run_info, handle_signals=True)
    finally:
        D.shutdown()
    if result.finished and result.score is not None:
        name = "top-1" if result.metric == "top1" else result.metric
        say(f"{name} after the last epoch: {result.score:.2f}%   (best of the evaluated epochs, selected on the test "
            f"split and so optimistic: {result.best_score_over_epochs:.2f}% at epoch {result.best_epoch})")
        say(f"results: {RunDir(out).results}")
    return 130 if result.stop_reason == "signal" else 0

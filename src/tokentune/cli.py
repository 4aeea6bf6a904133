"""The ``tokentune`` command line: ``train``, ``eval``, ``summarize``, ``demo``.

Every option is documented in ``--help``. Method options are generated from the method config
dataclasses (``--lora-rank``, ``--tome-r``, ``--adapter-bottleneck``, and those of every method
registered later, e.g. PYRA and DyT) and training options from
:class:`tokentune.config.TrainConfig` (``--lr``, ``--epochs``, ...), with their documentation
taken from the dataclasses' ``Attributes:`` docstring sections.

Adding a subcommand: write ``_add_<name>(parser)`` (declare options) and ``_run_<name>(args)``
(return an exit code) and register them in :data:`COMMANDS` (or call :func:`register_command`
from another module before :func:`main` runs).

Value syntax (shown in ``--help``): lists are comma-separated (``--tome-r 16,16,10``, with
``VALUExCOUNT`` repetition: ``--tome-r 16x11,10``), a ``(r, inflect)`` tuple is written with
the float as in Python (``--tome-r 16,-1.0``), booleans as ``true``/``false`` (a bare flag means
true), ``none`` clears an optional value, dictionaries are JSON.
"""
from __future__ import annotations

import argparse
import collections.abc
import dataclasses
import inspect
import json
import os
import re
import sys
import typing
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

from .errors import TokenTuneError

DEFAULT_MODEL = "vit_base_patch16_224.orig_in21k"
_NONE = ("none", "null")
_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


# ----------------------------------------------------------------------------- docstrings
def field_docs(cls: type) -> Dict[str, str]:
    """Field documentation from a dataclass docstring's ``Attributes:`` section."""
    doc = inspect.getdoc(cls) or ""
    docs: Dict[str, str] = {}
    lines = doc.splitlines()
    try:
        start = next(i for i, ln in enumerate(lines) if ln.strip() == "Attributes:")
    except StopIteration:
        return docs
    base, current = None, None
    for line in lines[start + 1:]:
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        if indent == 0:
            break                                  # the next section
        if base is None:
            base = indent
        m = re.match(r"^(\w+)\s*(\([^)]*\))?\s*:\s*(.*)$", line.strip())
        if indent == base and m:
            current = m.group(1)
            docs[current] = m.group(3).strip()
        elif indent > base and current is not None:
            docs[current] += " " + line.strip()
        elif indent < base:
            break
    # reST markup reads badly in a terminal: ``x`` and :func:`x` become x
    return {k: re.sub(r"(?::[\w:]+:)?`+~?([^`]*?)`+", r"\1", v) for k, v in docs.items()}


# ----------------------------------------------------------------------------- values
def _parse_bool(text: str) -> bool:
    t = str(text).strip().lower()
    if t in _TRUE:
        return True
    if t in _FALSE:
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def _split_list(text: str) -> List[str]:
    items: List[str] = []
    for part in [p.strip() for p in str(text).split(",")]:
        if not part:
            raise ValueError(f"empty item in {text!r}")
        m = re.fullmatch(r"([+-]?[\d.eE+-]+)[x*](\d+)", part)
        items.extend([m.group(1)] * int(m.group(2)) if m else [part])
    return items


def _literal(text: str):
    for caster in (lambda v: convert(int, v), float):
        try:
            return caster(text)
        except ValueError:
            continue
    return text


def _is_sequence(hint) -> bool:
    origin = typing.get_origin(hint)
    if origin in (list, collections.abc.Sequence, typing.Sequence):
        return True
    return origin is tuple and len(typing.get_args(hint)) == 2 and typing.get_args(hint)[1] is Ellipsis


def _priority(hint) -> int:
    if hint is bool:
        return 0
    if hint is int:
        return 1
    if hint is float:
        return 2
    if _is_sequence(hint):
        return 3
    if typing.get_origin(hint) is tuple:
        return 4
    if hint is str:
        return 9
    return 5


def convert(hint, text: str):
    """Parse ``text`` as a value of the type ``hint`` (raises ValueError)."""
    origin = typing.get_origin(hint)
    if hint is Any or hint is object:
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text
    if origin is typing.Union:
        members = typing.get_args(hint)
        if type(None) in members and str(text).strip().lower() in _NONE:
            return None
        listy = "," in str(text) and any(_is_sequence(m) or typing.get_origin(m) is tuple for m in members)
        for member in sorted((m for m in members if m is not type(None)), key=_priority):
            if member is str and listy:      # "16,abc" is a broken list, not a name
                continue
            try:
                return convert(member, text)
            except (ValueError, TypeError):
                continue
        raise ValueError(f"{text!r} fits none of {describe(hint)}")
    if origin is typing.Literal:
        choices = typing.get_args(hint)
        for c in choices:
            if str(c) == text:
                return c
        raise ValueError(f"choose from {', '.join(map(str, choices))}")
    if hint is bool:
        return _parse_bool(text)
    if hint is int:
        if not re.fullmatch(r"[+-]?\d+", str(text).strip()):
            raise ValueError(f"expected an integer, got {text!r}")
        return int(text)
    if hint is float:
        return float(text)
    if hint is str:
        return str(text)
    if _is_sequence(hint):
        elem = typing.get_args(hint)[0] if typing.get_args(hint) else str
        values = [convert(elem, item) for item in _split_list(text)]
        return tuple(values) if origin is tuple else values
    if origin is tuple:
        types = typing.get_args(hint)
        items = [p.strip() for p in str(text).split(",")]
        if len(items) != len(types):
            raise ValueError(f"expected {len(types)} comma-separated values")
        values = []
        for t, item in zip(types, items):
            if t is float and re.fullmatch(r"[+-]?\d+", item):
                raise ValueError("write the float with a decimal point")
            values.append(convert(t, item))
        return tuple(values)
    if origin is dict or hint is dict:
        value = json.loads(text)
        if not isinstance(value, dict):
            raise ValueError("expected a JSON object")
        return value
    if hint in (list, tuple):   # unparameterised: comma-separated numbers or words
        values = [_literal(item) for item in _split_list(text)]
        return tuple(values) if hint is tuple else values
    if isinstance(hint, type):
        return hint(text)
    raise ValueError(f"cannot parse {describe(hint)} from the command line")


def describe(hint) -> str:
    """The command-line syntax of a type, for ``--help``."""
    origin = typing.get_origin(hint)
    if origin is typing.Union:
        members = [m for m in typing.get_args(hint) if m is not type(None)]
        text = " | ".join(describe(m) for m in sorted(members, key=_priority))
        return text + (" | none" if type(None) in typing.get_args(hint) else "")
    if origin is typing.Literal:
        return "{" + ",".join(map(str, typing.get_args(hint))) + "}"
    if hint is bool:
        return "true|false"
    if hint in (int, float, str):
        return hint.__name__.upper()
    if _is_sequence(hint):
        elem = typing.get_args(hint)[0] if typing.get_args(hint) else str
        return f"{describe(elem)},{describe(elem)},..."
    if origin is tuple:
        return "(" + ",".join(describe(t) for t in typing.get_args(hint)) + ")"
    if origin is dict or hint is dict:
        return "JSON"
    return "VALUE"


def _default_of(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()                    # type: ignore[misc]
    return None


def _show(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return ",".join(_show(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value) if value else "{}"
    return str(value)


@dataclass
class DataclassOption:
    """One generated option: ``--<prefix><field>`` parsed into ``dest``."""

    flag: str
    dest: str
    field: str
    hint: Any


def add_dataclass_options(group, cls: type, prefix: str, dest_prefix: str,
                          defaults: Optional[Dict[str, Any]] = None, skip: Tuple[str, ...] = ()) -> List[DataclassOption]:
    """Add one option per dataclass field, documented from the ``Attributes:`` docstring."""
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    added = []
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        hint = hints.get(f.name, str)
        flag = "--" + prefix + f.name.replace("_", "-")
        dest = dest_prefix + f.name
        default = (defaults or {}).get(f.name, _default_of(f))
        help_text = (docs.get(f.name) or "(undocumented)").rstrip(".")
        help_text = f"{help_text}. [{describe(hint)}; default: {_show(default)}]".replace("%", "%%")

        def parse(text, hint=hint, flag=flag):
            try:
                return convert(hint, text)
            except (ValueError, TypeError) as exc:
                raise argparse.ArgumentTypeError(f"{flag}: {exc}") from None

        kwargs = dict(dest=dest, type=parse, default=argparse.SUPPRESS, help=help_text, metavar=_metavar(hint))
        if hint is bool:
            kwargs.update(nargs="?", const=True)
        group.add_argument(flag, **kwargs)
        if hint is bool and not f.name.startswith("no_"):
            no_flag = "--no-" + prefix + f.name.replace("_", "-")
            group.add_argument(no_flag, dest=dest, action="store_const", const=False, default=argparse.SUPPRESS,
                               help=f"same as {flag} false")
        added.append(DataclassOption(flag, dest, f.name, hint))
    return added


def _metavar(hint) -> str:
    if hint is bool:
        return "BOOL"
    text = describe(hint)
    return text if len(text) <= 16 and "," not in text else "VALUE"


# ----------------------------------------------------------------------------- shared options
def _pretrained(text: str):
    t = text.strip()
    if t.lower() in ("hub", "true", "yes", "1"):
        return True
    if t.lower() in ("none", "false", "no", "0", "random"):
        return False
    return t


def _timm_kwarg(text: str) -> Tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--timm expects KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    low = value.strip().lower()
    if low in ("true", "false"):
        return key.strip(), low == "true"
    return key.strip(), (None if low in _NONE else _literal(value))


def _add_data_options(parser, required: bool = True) -> None:
    g = parser.add_argument_group("data")
    g.add_argument("--data", metavar="ROOT", help="VTAB-1k root: the folder holding the prepared task folders "
                   "(<ROOT>/<name>/<split>.txt and <ROOT>/<name>/images/<split>/*.jpg)")
    g.add_argument("--dataset", metavar="NAME", help="VTAB-1k task name (cifar, caltech101, dtd, oxford_flowers102, "
                   "oxford_iiit_pet, svhn, sun397, patch_camelyon, eurosat, resisc45, diabetic_retinopathy, "
                   "clevr_count, clevr_dist, dmlab, kitti, dsprites_loc, dsprites_ori, smallnorb_azi, "
                   "smallnorb_ele; aliases cifar100, oxford_pet, ...)")
    g.add_argument("--image-folder", metavar="DIR", help="instead of VTAB-1k: a class-per-folder tree "
                   "DIR/train/<class>/*.jpg and DIR/test/<class>/*.jpg (or val/)")
    g.add_argument("--skip-bad-images", action="store_true",
                   help="every image is checked first (it exists, its header decodes, its mode is supported); leave "
                        "the bad ones out, reported and recorded, instead of stopping with an error")


def _add_method_options(parser, defaults: Optional[Dict[str, Any]] = None) -> List[Tuple[str, DataclassOption]]:
    from .methods import available_methods, get_method

    options = []
    for name in available_methods():
        method = get_method(name)
        if method.config is None:
            continue
        g = parser.add_argument_group(f"{name} options", f"{method.summary} (used when --method includes {name})"
                                      .replace("%", "%%"))
        for opt in add_dataclass_options(g, method.config, f"{name}-", f"m__{name}__"):
            options.append((name, opt))
    return options


# ----------------------------------------------------------------------------- train
def _add_train(parser) -> None:
    from .config import TrainConfig, available_recipes

    g = parser.add_argument_group("model")
    g.add_argument("--model", metavar="NAME", default=argparse.SUPPRESS,
                   help=f"timm ViT name [default: {DEFAULT_MODEL}, the ImageNet-21k ViT-B/16 of the VTAB-1k papers]")
    g.add_argument("--method", metavar="SPEC", default=argparse.SUPPRESS,
                   help="method spec, methods joined by '+': e.g. lora, lora+tome, adapter, full, linear, pyra, dyt "
                        "(see the option groups below) [default: lora]")
    g.add_argument("--pretrained", type=_pretrained, metavar="hub|PATH|none", default=argparse.SUPPRESS,
                   help="backbone weights: 'hub' (timm hub, needs internet once; offline and not cached it fails at "
                        "once), a local .npz/.pth/.safetensors file (e.g. Google's ViT-B_16.npz), or 'none' (random "
                        "init) [default: hub]")
    g.add_argument("--num-classes", type=int, metavar="N", default=argparse.SUPPRESS,
                   help="classes of the new head [default: the dataset's]")
    g.add_argument("--head-init-std", type=float, metavar="STD", default=argparse.SUPPRESS,
                   help="re-initialise the head with trunc_normal(STD) weights and zero bias (DyT: 0.01) "
                        "[default: timm's initialisation]")
    g.add_argument("--train-head", type=_parse_bool, metavar="BOOL", default=argparse.SUPPRESS,
                   help="train the classification head [default: true]")
    g.add_argument("--drop-path-rate", type=float, metavar="P", default=argparse.SUPPRESS,
                   help="stochastic depth rate of the backbone (PYRA: 0.1) [default: 0]")
    g.add_argument("--timm", type=_timm_kwarg, action="append", metavar="KEY=VALUE", default=argparse.SUPPRESS,
                   help="any other timm.create_model keyword, repeatable (e.g. --timm drop_rate=0.1)")
    recipes = available_recipes()
    g.add_argument("--recipe", metavar="NAME", default=argparse.SUPPRESS,
                   help="a paper's model and training options as defaults (explicit options win); available: "
                        + (", ".join(f"{n} ({r.summary})" if r.summary else n for n, r in sorted(recipes.items()))
                           or "none registered").replace("%", "%%"))
    _add_data_options(parser)
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
    _add_method_options(parser)


def _explicit(args) -> Dict[str, Any]:
    return {k: v for k, v in vars(args).items() if not k.startswith("_")}


def _resolve_train_options(args) -> Dict[str, Any]:
    """Merge (lowest to highest): built-in defaults, the resumed run's options, the recipe, explicit options."""
    from .checkpoint import read_config
    from .config import TrainConfig, get_recipe

    given = _explicit(args)
    opts: Dict[str, Any] = {"model": DEFAULT_MODEL, "method": "lora", "pretrained": True, "num_classes": None,
                            "head_init_std": None, "train_head": True, "model_options": {}, "train": {},
                            "data": None, "dataset": None, "image_folder": None, "recipe": None,
                            "skip_bad_images": False}
    out = given.get("out")
    if (given.get("resume") or given.get("restart_from_weights")) and out and os.path.isfile(os.path.join(out, "config.json")):
        saved = (read_config(out).get("run") or {}).get("cli")
        if saved:   # the interrupted run's options (recipe already applied) become the defaults
            opts.update({k: v for k, v in saved.items() if k in opts})
    recipe_name = given.get("recipe")
    if recipe_name:
        recipe = get_recipe(recipe_name)
        opts["recipe"] = recipe.name
        opts["method"] = recipe.method
        for k, v in recipe.model_options.items():
            if k in ("model", "pretrained", "num_classes", "head_init_std", "train_head"):
                opts[k] = v
            else:
                opts["model_options"][k] = v
        train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
        bad = sorted(set(recipe.train_options) - train_fields)
        if bad:
            raise TokenTuneError(f"recipe {recipe.name!r} sets unknown training option(s) {', '.join(bad)}")
        opts["train"].update(recipe.train_options)
    for k in ("model", "method", "pretrained", "num_classes", "head_init_std", "train_head", "data", "dataset",
              "image_folder"):
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
        elif k.startswith("m__"):
            _, method, field = k.split("__", 2)
            opts["model_options"][f"{method}_{field}"] = v
    return opts


def _run_train(args) -> int:
    from . import distributed as D
    from .config import TrainConfig
    from .data import load_datasets, set_transforms, skipped_summary
    from .methods import check_model_options, create_model
    from .params import count_parameters
    from .train import train, validate_config

    opts = _resolve_train_options(args)
    cfg = TrainConfig(**{k: (tuple(v) if k == "betas" else v) for k, v in opts["train"].items()})
    validate_config(cfg)
    check_model_options(opts["method"], opts["model_options"])   # before any data is read
    given = _explicit(args)
    inf = D.init_distributed(given.get("device"))
    say = print if inf.is_main else (lambda *a, **k: None)
    try:
        train_ds, test_ds = load_datasets(data_root=opts["data"], dataset=opts["dataset"],
                                          image_folder=opts["image_folder"], train_split=cfg.train_split,
                                          test_split=cfg.test_split, skip_bad_images=opts["skip_bad_images"],
                                          progress=False if given.get("no_progress") else None)
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
                             head_init_std=opts["head_init_std"], seed=cfg.seed, **model_options)
        set_transforms([train_ds, test_ds], model, cfg.image_size, cfg.normalization, cfg.interpolation)
        out = given.get("out") or os.path.join("runs", f"{train_ds.name}-{model.tokentune_spec['method']}")
        c = count_parameters(model)
        say(f"model {opts['model']} method {model.tokentune_spec['method']}: {c['trainable']:,} trainable of "
            f"{c['total']:,} parameters (paper count {c['paper_trainable']:,} = {c['paper_pct']:.3f}% of the backbone)")
        say(f"data {train_ds.name}: {len(train_ds)} training images ({train_ds.split}), {len(test_ds)} test images "
            f"({test_ds.split}), {num_classes} classes; {inf.world_size} process(es); run directory {out}")
        cli_record = {k: opts[k] for k in ("model", "method", "pretrained", "num_classes", "head_init_std",
                                           "train_head", "data", "dataset", "image_folder", "recipe",
                                           "skip_bad_images")}
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
    if result.finished and result.top1 is not None:
        say(f"top-1 after the last epoch: {result.top1:.2f}%   (best of the evaluated epochs, selected on the test "
            f"split and so optimistic: {result.best_top1_over_epochs:.2f}% at epoch {result.best_epoch})")
        say(f"results: {os.path.join(out, 'results.json')}")
    return 130 if result.stop_reason == "signal" else 0


# ----------------------------------------------------------------------------- eval
def _add_eval(parser) -> None:
    parser.add_argument("run", metavar="RUN_DIR", help="a run directory written by 'tokentune train' (or save_trained)")
    parser.add_argument("--split", default=None, metavar="SPLIT",
                        help="split to evaluate [default: the run's test split, e.g. test]")
    parser.add_argument("--pretrained", type=_pretrained, default=None, metavar="hub|PATH|none",
                        help="where the frozen backbone weights come from [default: as recorded in the run]")
    _add_data_options(parser)
    parser.add_argument("--batch-size", type=int, default=256, metavar="N", help="evaluation batch size [default: 256]")
    parser.add_argument("--device", default=None, metavar="DEV", help="auto, cpu, cuda, cuda:N [default: auto]")
    parser.add_argument("--amp", default=None, choices=["auto", "off", "bf16", "fp16"],
                        help="autocast precision [default: the run's]")
    parser.add_argument("--num-workers", type=int, default=2, metavar="N", help="data-loading processes [default: 2]")
    parser.add_argument("--deploy", action="store_true",
                        help="evaluate the deployed model (LoRA merged, method deploy hooks applied)")
    parser.add_argument("--json", metavar="FILE", default=None, help="also write the result as JSON to FILE")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _run_eval(args) -> int:
    from . import distributed as D
    from .checkpoint import atomic_write_json, load_trained, read_config
    from .data import check_images, image_folder_dataset, set_transforms, skipped_summary, vtab_dataset
    from .deploy import deploy
    from .evaluate import evaluate

    config = read_config(args.run)
    cli = (config.get("run") or {}).get("cli") or {}
    train_cfg = config.get("train_config") or {}
    data_info = config.get("data") or {}
    split = args.split or train_cfg.get("test_split", "test")
    inf = D.init_distributed(args.device)
    try:
        dev = D.resolve_device(args.device)
        model = load_trained(args.run, pretrained=args.pretrained)
        recorded_folder = cli.get("image_folder") or (data_info.get("root") if data_info.get("kind") == "folder" else None)
        if args.image_folder or (not args.dataset and recorded_folder):
            folder = args.image_folder or recorded_folder
            train_split = train_cfg.get("train_split", "train")
            classes = image_folder_dataset(folder, train_split).classes
            ds = image_folder_dataset(folder, split, classes=classes)
        else:
            name = args.dataset or cli.get("dataset") or data_info.get("name")
            root = args.data or cli.get("data") or data_info.get("root")
            if not name or not root:
                raise TokenTuneError(f"{args.run} does not record its dataset; pass --data ROOT --dataset NAME or --image-folder DIR")
            ds = vtab_dataset(root, name, split, check_files=False)   # check_images reports missing files
        check_images([ds], args.skip_bad_images, progress=False if args.no_progress else None)
        skipped = skipped_summary([ds])
        if skipped and inf.is_main:
            print(skipped + (f" (all of them are listed in {args.json})" if args.json else ""))
        if ds.num_classes > model.num_classes:
            raise TokenTuneError(f"{ds.name} has {ds.num_classes} classes but the model's head has {model.num_classes}")
        set_transforms([ds], model, train_cfg.get("image_size"), train_cfg.get("normalization", "auto"),
                       train_cfg.get("interpolation", "bicubic"))
        model.to(dev)
        if args.deploy:
            model = deploy(model)
        metrics = evaluate(model, ds, batch_size=args.batch_size, device=dev,
                           amp=args.amp or train_cfg.get("amp", "auto"), num_workers=args.num_workers,
                           progress=False if args.no_progress else None)
    finally:
        D.shutdown()
    record = {"run": os.path.abspath(args.run), "dataset": ds.name, "split": ds.split, "deployed": args.deploy,
              "method": config.get("method"), "model": config.get("model"), **metrics, "skipped": ds.skipped}
    if inf.is_main:
        print(f"{ds.name} {ds.split}: top-1 {metrics['top1']:.2f}% ({metrics['correct']}/{metrics['total']})"
              f"{' [deployed]' if args.deploy else ''}")
        if args.json:
            atomic_write_json(args.json, record)
    return 0


# ----------------------------------------------------------------------------- summarize
def _add_summarize(parser) -> None:
    parser.add_argument("paths", nargs="+", metavar="PATH", help="run directories, or folders that contain them")
    parser.add_argument("--metric", choices=["top1", "best"], default="top1",
                        help="top1: after the last epoch (report this); best: best over the evaluated epochs "
                             "(optimistic, labelled as such) [default: top1]")
    parser.add_argument("--label", choices=["auto", "method", "model+method", "dir"], default="auto",
                        help="how runs form rows: by method (auto adds the model when several appear), or by "
                             "the name of the folder holding the run [default: auto]")
    parser.add_argument("--md", metavar="FILE", default=None, help="also write the Markdown table to FILE")
    parser.add_argument("--json", metavar="FILE", default=None, help="also write the summary as JSON to FILE")


def _run_summarize(args) -> int:
    from .checkpoint import atomic_write, atomic_write_json
    from .evaluate import summarize, summary_markdown

    metric = "best_top1_over_epochs" if args.metric == "best" else "top1"
    summary = summarize(args.paths, metric=metric, label=args.label)
    text = summary_markdown(summary)
    print(text, end="")
    if args.md:
        def write(tmp):
            with open(tmp, "w") as fh:
                fh.write(text)
        atomic_write(args.md, write)
    if args.json:
        atomic_write_json(args.json, summary)
    return 0


# ----------------------------------------------------------------------------- demo
def _add_demo(parser) -> None:
    from .demo import DemoConfig

    g = parser.add_argument_group("demo options (tokentune.demo.DemoConfig)")
    add_dataclass_options(g, DemoConfig, "", "d__")


def _run_demo(args) -> int:
    from .demo import DemoConfig, run_demo

    cfg = DemoConfig(**{k[3:]: v for k, v in vars(args).items() if k.startswith("d__")})
    run_demo(cfg)
    return 0


# ----------------------------------------------------------------------------- export, viz
def _add_export(parser) -> None:
    from .export import add_export_command
    add_export_command(parser)


def _run_export(args) -> int:
    from .export import run_export_command
    return run_export_command(args)


def _add_viz(parser) -> None:
    from .viz import add_viz_command
    add_viz_command(parser)


def _run_viz(args) -> int:
    from .viz import run_viz_command
    return run_viz_command(args)


# ----------------------------------------------------------------------------- registry
@dataclass
class Command:
    """A subcommand: ``add(parser)`` declares its options, ``run(args) -> exit code`` runs it."""

    help: str
    add: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    description: str = ""


#: Subcommands in ``--help`` order. To add one (e.g. ``bench``, ``export``, ``viz``): write its
#: ``_add_x``/``_run_x`` pair and add an entry here, or call :func:`register_command`.
COMMANDS: Dict[str, Command] = {
    "train": Command("fine-tune a ViT with a method on VTAB-1k or an image folder", _add_train, _run_train,
                     "Train, evaluate after the 1st epoch, every --eval-every epochs and at the end, and write a "
                     "run directory (checkpoint after every epoch; --resume continues an interrupted run). "
                     "Multi-GPU: torchrun --nproc_per_node N -m tokentune train ... "
                     "Value syntax: lists are comma-separated (--tome-r 16,16,10, with repetition: 16x11,10); a "
                     "tuple such as ToMe's (r, inflect) is written as in Python with the float's decimal point "
                     "(--tome-r 16,-1.0); booleans are true/false (a bare flag means true); 'none' clears an "
                     "optional value; dictionaries are JSON (--param-groups '{\"blocks\\\\.0\\\\.\": {\"lr\": 0}}')."),
    "eval": Command("evaluate a run directory on a split", _add_eval, _run_eval,
                    "Rebuild the trained model of a run directory and report top-1 on a split."),
    "summarize": Command("VTAB-1k table over run directories", _add_summarize, _run_summarize,
                         "Per-task top-1, Natural/Specialized/Structured means, the mean of the 3 group means and "
                         "the mean over tasks, as Markdown (and JSON). Runs on image folders (or other non-VTAB "
                         "data) get a table of their own, one column per dataset, outside every VTAB-1k mean."),
    "demo": Command("offline demo on scikit-learn's digits (about 1-2 minutes on a laptop CPU)", _add_demo, _run_demo,
                    "Pre-train a tiny ViT on digits 0-4, adapt it to digits 5-9 with several methods and print "
                    "accuracy, trainable parameters, tokens, FLOPs and throughput side by side. No download."),
    "export": Command("write the deployed model of a run (one safetensors file + config; optional ONNX)", _add_export,
                      _run_export,
                      "Deploy a run (LoRA merged, method deploy hooks applied) and write OUT/deployed.safetensors with "
                      "every tensor plus OUT/deployed.json; tokentune.load_deployed(OUT) rebuilds it with torch, timm "
                      "and tokentune only. --onnx also writes OUT/model.onnx."),
    "viz": Command("pictures: merged tokens, DyT activated tokens and rates, accuracy vs speed", _add_viz, _run_viz,
                   "merge: which patches ToMe/PYRA merged, at several depths; dyt-tokens: the patches each DyT "
                   "layer activates; dyt-rates: DyT activation rate per layer; tradeoff: accuracy versus "
                   "throughput or FLOPs across methods. Needs matplotlib (pip install 'tokentune[viz]')."),
}


def register_command(name: str, command: Command) -> None:
    COMMANDS[name] = command


def _register_bench() -> None:   # `tokentune bench` lives in tokentune.bench_cli
    from . import bench_cli
    register_command("bench", Command(bench_cli.HELP, bench_cli.add_bench_options, bench_cli.run_bench,
                                      bench_cli.DESCRIPTION))


_register_bench()


EPILOG = """examples:
  tokentune demo
  tokentune train --data vtab-1k --dataset cifar --method lora --pretrained ViT-B_16.npz --out runs/cifar-lora
  tokentune train --data vtab-1k --dataset cifar --method lora+tome --tome-r 16x11,10 --pretrained ViT-B_16.npz
  tokentune train --out runs/cifar-lora --resume
  tokentune eval runs/cifar-lora --deploy
  tokentune summarize runs/
  tokentune export runs/cifar-lora exported/cifar-lora --onnx
  tokentune viz merge runs/cifar-pyra image.jpg --out merge.png
Run 'tokentune COMMAND --help' for every option of a command."""


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="tokentune", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Adapt pretrained Vision Transformers cheaply (LoRA, adapters) and run them fast "
                    "(ToMe, PYRA, Dynamic Tuning).")
    parser.add_argument("--version", action="version", version=f"tokentune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.description or cmd.help)
        cmd.add(p)
        p.set_defaults(_run=cmd.run)
    return parser


def _error_line(exc: BaseException) -> str:
    from .data import clean_error
    return " ".join(clean_error(exc).split())


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``tokentune`` console script; returns the exit code."""
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if getattr(args, "_run", None) is None:
            parser.print_help()
            return 2
        return int(args._run(args) or 0)
    except TokenTuneError as exc:
        rank = os.environ.get("RANK", "0")
        prefix = f"[rank {rank}] " if rank != "0" else ""
        print(f"{prefix}error: {_error_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted (a training run keeps its last checkpoint: continue it with --resume)", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - only out-of-memory becomes a one-line error; bugs keep their traceback
        if type(exc).__name__ != "OutOfMemoryError":
            raise
        print("error: out of GPU memory; lower --batch-size (keep the optimizer batch with --grad-accum), add "
              "--grad-checkpointing or use --amp bf16", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

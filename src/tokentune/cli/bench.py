"""``tokentune bench``: parameters, FLOPs, throughput, latency and memory of configurations side by side."""
from __future__ import annotations

import argparse
import sys
import textwrap
from typing import List

import torch

from ..errors import TokenTuneError
from ..precision import DTYPES
from ..tools.bench import (
    AUTO,
    DEFAULT_MODEL,
    BenchSettings,
    Candidate,
    default_name,
    markdown,
    measure,
    parse_config,
    run_candidate,
    write_outputs,
)
from .options import add_task_options, parse_pretrained, timm_kwarg

HELP = "measure parameters, FLOPs, throughput, latency and memory of configurations side by side"
DESCRIPTION = ("Build every configuration (--config METHOD[:OPTIONS]) or trained run (--run DIR), deploy it, and "
               "measure parameters, FLOPs (attention counted), interleaved inference throughput (median and "
               "min-max), batch-1 latency, inference memory and training step time and memory, all in one "
               "process on the same random batch. Prints a table and writes Markdown, JSON and CSV files.")


EPILOG = """configuration syntax (--config, repeatable; rows keep the order given):
  METHOD[+METHOD...][:KEY=VALUE[,KEY=VALUE...]]
  METHOD   a method spec as in 'tokentune train --method': lora, lora+tome, pyra, dyt, dyt+tome,
           adapter+tome, full+tome, linear, ...
  KEY      <method>_<field> (tome_r, lora_rank, dyt_variant, pyra_variant, adapter_bottleneck, ...),
           or <field> alone when one method of the spec has it (r, rank, variant); values as in
           'tokentune train' (lists 16,16,10 or 16x11,10; true/false; none). A comma starts the next
           option only when NAME= follows it, so list values keep their commas. Reserved keys:
             label=TEXT    the row's name (default: the configuration text)
             model=NAME    another timm model for this row (e.g. the small-model baseline)
             rate=R        DyT: calibrate the untrained dispatchers to activate R of the patch tokens
                           of the timed batch (default: dyt_target_rate, 0.5; none: as initialised)
             deploy=false  time the training form (eval mode) instead of tokentune.deploy's model
             quantize=int8-dynamic
                           the deployed model with int8 Linear layers (tokentune.deploy's quantize=;
                           CPU, fp32 only), timed beside the fp32 rows; the table marks it in a
                           precision column and gives its largest logit difference from its fp32 form
             timm_<kw>=V   a timm.create_model keyword for this row only (timm_embed_dim=384)
  --run DIR adds a trained run directory (tokentune train) or an export directory as a row.

The first row is the baseline of the FLOPs ratio and speed-up columns. Every model is deployed
(LoRA merged; plain LoRA becomes the timm ViT with fused SDPA) and timed in interleaved rounds on
the same random batch. Random weights are fine for speed (--pretrained none, the default for
new models); DyT is calibrated as above because its cost depends on its activation rate.

examples:
  tokentune bench --config lora --config lora+tome:tome_r=low --config pyra:tome_r=high
  tokentune bench --config lora --config "dyt:dyt_variant=layer,rate=0.5" --config dyt+tome:tome_r=8
  tokentune bench --config lora --config "lora:model=vit_small_patch16_224,rank=4,label=ViT-S LoRA" --no-train
  tokentune bench --config lora --config lora:quantize=int8-dynamic --config lora+tome:r=high \
      --config lora+tome:r=high,quantize=int8-dynamic --batch-size 1 --no-train
  tokentune bench --config lora --run runs/cifar-pyra --run exports/cifar-dyt --dtype bf16 --device cuda
  tokentune bench --config lora --config lora+tome:r=high --config "dyt:inference=capacity,capacity=1.0" --sweep 1,8,32,128"""


class _Entry(argparse.Action):
    """--config and --run append to one ordered list, so rows keep the command-line order."""

    def __call__(self, parser, namespace, values, option_string=None):
        entries = list(getattr(namespace, "entries", None) or [])
        entries.append(("run" if option_string == "--run" else "config", values))
        namespace.entries = entries


def add(parser: argparse.ArgumentParser) -> None:
    """Declare the options of ``tokentune bench``."""

    parser.formatter_class = argparse.RawDescriptionHelpFormatter   # keeps the syntax block below as written
    parser.description = textwrap.fill(DESCRIPTION, 100)
    parser.epilog = EPILOG
    parser.set_defaults(entries=[])
    g = parser.add_argument_group("what to measure")
    g.add_argument("--config", action=_Entry, metavar="SPEC", dest="entries",
                   help="a configuration METHOD[:KEY=VALUE,...] (syntax below); repeatable")
    g.add_argument("--run", action=_Entry, metavar="DIR", dest="entries",
                   help="a trained run directory or export directory; repeatable")
    g.add_argument("--model", default=DEFAULT_MODEL, metavar="NAME",
                   help=f"timm ViT of the configurations [default: {DEFAULT_MODEL}]")
    g.add_argument("--image-size", type=int, default=None, metavar="PX",
                   help="input resolution [default: the model's, 224 for the ViT-B/16]")
    g.add_argument("--num-classes", type=int, default=100, metavar="N", help="head classes of new models [default: 100]")
    g.add_argument("--pretrained", type=parse_pretrained, default=None, metavar="hub|PATH|none",
                   help="backbone weights [default: random for new models (speed does not depend on them), as "
                        "recorded for --run]")
    g.add_argument("--timm", type=timm_kwarg, action="append", default=[], metavar="KEY=VALUE",
                   help="extra timm.create_model keyword for new models, repeatable (e.g. --timm embed_dim=64)")
    g.add_argument("--rate", type=float, default=None, metavar="R",
                   help="calibrate every DyT row without its own rate= (runs included) to activation R")
    add_task_options(parser)
    g = parser.add_argument_group("how to measure")
    g.add_argument("--batch-size", type=int, default=16, metavar="N", help="batch of the throughput and training "
                   "measurements [default: 16]")
    g.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="fp32, or bf16/fp16 autocast [default: fp32]")
    g.add_argument("--device", default=AUTO, metavar="DEV", help="auto, cpu, cuda, cuda:N [default: auto]")
    g.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads (torch.set_num_threads) "
                   "[default: torch's]")
    g.add_argument("--rounds", type=int, default=10, metavar="N", help="timed interleaved rounds [default: 10]")
    g.add_argument("--warmup", type=int, default=2, metavar="N", help="untimed forwards per model first [default: 2]")
    g.add_argument("--latency-iters", type=int, default=3, metavar="N",
                   help="batch-1 forwards per model and round [default: 3]")
    g.add_argument("--train-steps", type=int, default=3, metavar="N", help="timed training steps [default: 3]")
    g.add_argument("--no-train", action="store_true", help="skip the training step measurement")
    g.add_argument("--no-latency", action="store_true", help="skip the batch-1 latency measurement")
    g.add_argument("--no-memory", action="store_true", help="skip the inference peak-memory measurement")
    g.add_argument("--sweep", default=None, metavar="B,B,...",
                   help="also time every row at these batch sizes, with peak memory (e.g. 1,8,32,128)")
    g.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the weights and the batch [default: 0]")
    g = parser.add_argument_group("output")
    g.add_argument("--out", default="bench-results", metavar="DIR",
                   help="directory for NAME.md, NAME.json and NAME.csv [default: bench-results]")
    g.add_argument("--name", default=None, metavar="NAME",
                   help="file name stem [default: bench-<model>-<size>px-b<batch>-<dtype>-<device>]")
    g.add_argument("--quiet", action="store_true", help="no progress lines (on stderr)")


def _batch_sizes(text: str) -> tuple:
    """``--sweep 1,8,32`` -> (1, 8, 32), one-line errors."""
    try:
        sizes = tuple(int(b) for b in text.split(","))
    except ValueError:
        raise TokenTuneError(f"--sweep expects comma-separated batch sizes like 1,8,32,128, got {text!r}") from None
    if min(sizes) < 1:
        raise TokenTuneError(f"--sweep batch sizes must be at least 1, got {text!r}")
    return sizes


def candidates_from_args(args: argparse.Namespace) -> List[Candidate]:
    """Parse every --config / --run (all syntax errors before any model is built)."""
    out = []
    for kind, value in args.entries or []:
        out.append(run_candidate(value) if kind == "run" else parse_config(value))
    if not out:
        raise TokenTuneError("nothing to measure; give configurations, e.g. tokentune bench --config lora "
                             "--config lora+tome:tome_r=low")
    return out


def run(args: argparse.Namespace) -> int:
    """``tokentune bench``: measure, print the table, write the files."""
    candidates = candidates_from_args(args)
    if args.threads is not None:
        if args.threads < 1:
            raise TokenTuneError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    settings = BenchSettings(model=args.model, image_size=args.image_size, batch_size=args.batch_size, dtype=args.dtype,
                             device=args.device, rounds=args.rounds, warmup=args.warmup, latency=not args.no_latency,
                             latency_iters=args.latency_iters, memory=not args.no_memory, train=not args.no_train,
                             train_steps=args.train_steps, num_classes=args.num_classes, pretrained=args.pretrained,
                             timm_kwargs=dict(args.timm or []), rate=args.rate, seed=args.seed,
                             task=_task(args), task_options=_task_options(args),
                             sweep=_batch_sizes(args.sweep) if args.sweep else ())
    if args.rate is not None and not 0.0 <= args.rate <= 1.0:
        raise TokenTuneError(f"--rate must be in [0, 1], got {args.rate}")
    progress = None if args.quiet else (lambda text: print(text, file=sys.stderr, flush=True))
    result = measure(candidates, settings, progress=progress)
    print(markdown(result), end="")
    paths = write_outputs(result, args.out, args.name or default_name(result))
    print(f"wrote {paths['md']}, {paths['json']}, {paths['csv']}")
    return 0


def _task(args: argparse.Namespace):
    task = getattr(args, "task", None)
    return None if task in (None, "classification") else task


def _task_options(args: argparse.Namespace):
    """``--<task>-<field>`` values as ``<task>_<field>`` keywords; only the chosen task's."""
    task = _task(args)
    options = {}
    for key, value in vars(args).items():
        if key.startswith("k__"):
            _, owner, name = key.split("__", 2)
            if owner != task:
                raise TokenTuneError(f"--{owner}-{name.replace('_', '-')} needs --task {owner}")
            options[f"{owner}_{name}"] = value
    return options

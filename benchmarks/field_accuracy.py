"""The field's token reducers on the demo's digits, over seeds: trained with LoRA, and off the shelf.

The demo's setup (scikit-learn's digits, the tiny ViT pre-trained on digits 0-4, adapted to 5-9; see
``tokentune demo``). For every seed: LoRA r=8 is trained once; then, for every method asked
(default: ToMe, PiToMe, ToFu, MCTF, DTEM), with the options of its row in the demo's ``--rows all``
table (``tokentune.tools.demo.ROWS``: the ToMe rows' schedule [16, 12, 8, 6], or MCTF's
``[0, 25, 19, 10]``, 58% of the unreduced multiply-adds), the method is

* trained with LoRA (``lora+<method>``: the demo's row itself, through its ``create_model -> train ->
  deploy -> evaluate`` path), and, for a method with ``training_free=True`` (asked through the registry),
* added *off the shelf* to that seed's trained LoRA model (the same weights, nothing trained: what
  ``tokentune eval RUN --add-method`` does).

Each seed sets the new layers' initialisation, the training order and dropout; the data and the backbone
stay those of the demo's seed 0. Reported: test top-1 (%) of the deployed models on the 448 test digits,
mean ± sample std over seeds, the multiply-adds per image and the training time. The JSON record is
rewritten after every row, so a stopped run keeps what it measured.

    python benchmarks/field_accuracy.py                              # seeds 0 1 2, the five methods
    python benchmarks/field_accuracy.py --seeds 0 --methods tome pitome --no-trained
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from typing import Any, Dict, List

import torch

from tokentune import create_model, deploy
from tokentune.core.method import get_method
from tokentune.engine.evaluate import evaluate
from tokentune.fileio import atomic_write_json, atomic_write_text
from tokentune.tools.demo import BACKBONE, ROWS, DemoConfig, DemoRow, adapt, count_macs, prepare_demo

METHODS = ("tome", "pitome", "tofu", "mctf", "dtem")


def lora_row() -> DemoRow:
    return next(r for r in ROWS if r.label == "LoRA r=8")


def method_row(name: str) -> DemoRow:
    """The demo's ``lora+<name>`` row; a method without one gets the ToMe rows' schedule on its rate option."""
    row = next((r for r in ROWS if r.method == f"lora+{name}"), None)
    return row or DemoRow(f"LoRA r=8 + {name}", f"lora+{name}", dict(lora_row().options), rate_of=name)


def rate_options(row: DemoRow, cfg: DemoConfig) -> Dict[str, Any]:
    """The row's options with its schedule filled in as ``tokentune.tools.demo.adapt`` fills it."""
    options = dict(row.options)
    name = row.method.split("+")[-1]
    if row.merge or row.rate_of:
        options[f"{name}_{get_method(name).rate_option}"] = list(cfg.tome_r)
    return options


def off_the_shelf(setup, lora_model, name: str, cfg: DemoConfig) -> Dict[str, float]:
    """The trained LoRA model with ``name`` added as its demo row has it: same weights, nothing trained."""
    model = create_model(BACKBONE, method=f"lora+{name}", num_classes=5, pretrained=setup.backbone,
                         **{**setup.arch, **rate_options(method_row(name), cfg)})
    missing, unexpected = model.load_state_dict(lora_model.state_dict(), strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    fast = deploy(model.eval())
    return {"top1": evaluate(fast, setup.test, batch_size=256, amp="off", progress=False)["top1"],
            "mmacs": macs(fast, setup)}


def macs(model, setup) -> float:
    sample = torch.stack([setup.test[i][0] for i in range(8)])
    return count_macs(model, sample) / 1e6


def summary(results: Dict[str, List[Dict[str, float]]]) -> List[Dict[str, Any]]:
    rows = []
    for label, recs in results.items():
        tops = [r["top1"] for r in recs]
        rows.append({"row": label, "top-1 mean": round(statistics.mean(tops), 2),
                     "top-1 std": round(statistics.stdev(tops), 2) if len(tops) > 1 else None,
                     "per seed": ", ".join(f"{x:.2f}" for x in tops), "MMACs/img": round(recs[0]["mmacs"], 2),
                     "train s": ", ".join(f"{r['train_s']:.0f}" for r in recs) if "train_s" in recs[0] else "-"})
    return rows


def write(args, cfg: DemoConfig, results: Dict[str, List[Dict[str, float]]]) -> str:
    rows = summary(results)
    md = (f"## Demo digits, the field's reducers, seeds {args.seeds}, {cfg.epochs} epochs, {args.threads} thread(s)\n\n"
          "| row | top-1 mean ± std | per seed | MMACs/img | training s per seed |\n|---|---|---|---|---|\n"
          + "".join(f"| {r['row']} | {r['top-1 mean']:.2f} ± {r['top-1 std'] or 0:.2f} | {r['per seed']} | "
                    f"{r['MMACs/img']:.2f} | {r['train s']} |\n" for r in rows))
    os.makedirs(args.out, exist_ok=True)
    prefix = os.path.join(args.out, "field_accuracy" + (f"_{args.tag}" if args.tag else ""))
    atomic_write_text(prefix + ".md", md)
    atomic_write_json(prefix + ".json", {"seeds": args.seeds, "tome_r": list(cfg.tome_r), "methods": args.methods,
                                         "threads": args.threads, "rows": rows, "results": results})
    return md


def trained(setup, row: DemoRow, cfg: DemoConfig, seed: int) -> Dict[str, float]:
    tic = time.perf_counter()
    done = adapt(setup, row, cfg, None, seed=seed)
    return {"top1": done.top1, "mmacs": macs(done.deployed, setup), "train_s": time.perf_counter() - tic,
            "model": done.model}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), help="methods added to LoRA (registry names)")
    ap.add_argument("--no-trained", action="store_true", help="only the off-the-shelf rows")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = DemoConfig(threads=args.threads)
    setup = prepare_demo(cfg, tempfile.mkdtemp(prefix="field-accuracy-"), out=print)
    results: Dict[str, List[Dict[str, float]]] = {}
    for seed in args.seeds:
        lora = trained(setup, lora_row(), cfg, seed)
        model = lora.pop("model")
        results.setdefault("LoRA r=8 (no reduction)", []).append(lora)
        for name in args.methods:
            if get_method(name).training_free:
                results.setdefault(f"LoRA r=8 + {name}, off the shelf", []).append(off_the_shelf(setup, model, name, cfg))
            if not args.no_trained:
                rec = trained(setup, method_row(name), cfg, seed)
                rec.pop("model")
                results.setdefault(f"LoRA r=8 + {name}, trained", []).append(rec)
            print(f"seed {seed}: " + ", ".join(f"{k} {v[-1]['top1']:.2f}" for k, v in results.items()
                                               if f"+ {name}," in k), flush=True)
            write(args, cfg, results)
    print(write(args, cfg, results))


if __name__ == "__main__":
    main()

"""The training-free token reducers on the demo's digits, over seeds: off the shelf and trained with LoRA.

The demo's setup (scikit-learn's digits, the tiny ViT pre-trained on digits 0-4, adapted to 5-9; see
``tokentune demo``). For every seed: LoRA r=8 is trained once; every registered method with
``training_free=True`` and a ``rate_option`` (asked through the registry: ToMe, PiToMe, ToFu, ...) is then

* added *off the shelf* to that trained LoRA model (the same weights, nothing trained: what
  ``tokentune eval RUN --add-method`` does), and
* trained with LoRA (``lora+<method>``, as the demo's ``--rows all`` rows),

both at the demo's ToMe schedule (the rate option gets ``tome_r``: equal tokens per block, 58% of the
unreduced multiply-adds). Reported: test top-1 of the deployed models, mean ± sample std over seeds.

    python benchmarks/field_accuracy.py                  # seeds 0 1 2
    python benchmarks/field_accuracy.py --seeds 0 --no-trained
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from typing import Dict, List

import torch

from tokentune import create_model, deploy
from tokentune.core.method import available_methods, get_method
from tokentune.engine.evaluate import evaluate
from tokentune.fileio import atomic_write_json, atomic_write_text
from tokentune.tools.demo import BACKBONE, ROWS, DemoConfig, DemoRow, adapt, prepare_demo


def rate_methods() -> List[str]:
    names = [n for n in available_methods() if get_method(n).training_free and get_method(n).rate_option]
    return sorted(names, key=lambda n: n != "tome")


def off_the_shelf(setup, lora_model, name: str, schedule) -> float:
    """The trained LoRA model with ``name`` added at ``schedule``: same weights, nothing trained."""
    option = f"{name}_{get_method(name).rate_option}"
    model = create_model(BACKBONE, method=f"lora+{name}", num_classes=5, pretrained=setup.backbone,
                         **{**setup.arch, **lora_row().options, option: list(schedule)})
    missing, unexpected = model.load_state_dict(lora_model.state_dict(), strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return evaluate(deploy(model.eval()), setup.test, batch_size=256, amp="off", progress=False)["top1"]


def lora_row() -> DemoRow:
    return next(r for r in ROWS if r.label == "LoRA r=8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--no-trained", action="store_true", help="only the off-the-shelf rows")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = DemoConfig()
    workdir = tempfile.mkdtemp(prefix="field-accuracy-")
    setup = prepare_demo(cfg, workdir, out=print)
    results: Dict[str, List[float]] = {}
    for seed in args.seeds:
        lora = adapt(setup, lora_row(), cfg, None, seed=seed)
        results.setdefault("LoRA r=8 (no reduction)", []).append(lora.top1)
        for name in rate_methods():
            results.setdefault(f"LoRA r=8 + {name}, off the shelf", []).append(
                off_the_shelf(setup, lora.model, name, cfg.tome_r))
            if not args.no_trained:
                row = DemoRow(f"LoRA r=8 + {name}", f"lora+{name}", dict(lora_row().options), rate_of=name)
                results.setdefault(f"LoRA r=8 + {name}, trained", []).append(adapt(setup, row, cfg, None, seed=seed).top1)
        print(f"seed {seed}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in results.items()), flush=True)
    rows = [{"row": k, "top-1 mean": round(statistics.mean(v), 2),
             "top-1 std": round(statistics.stdev(v), 2) if len(v) > 1 else None,
             "per seed": ", ".join(f"{x:.2f}" for x in v)} for k, v in results.items()]
    md = (f"## Demo digits, ToMe schedule {list(cfg.tome_r)}, seeds {args.seeds}, {cfg.epochs} epochs\n\n"
          "| row | top-1 mean ± std | per seed |\n|---|---|---|\n"
          + "".join(f"| {r['row']} | {r['top-1 mean']:.2f} ± {r['top-1 std'] or 0:.2f} | {r['per seed']} |\n" for r in rows))
    print(md)
    os.makedirs(args.out, exist_ok=True)
    prefix = os.path.join(args.out, "field_accuracy" + (f"_{args.tag}" if args.tag else ""))
    atomic_write_text(prefix + ".md", md)
    atomic_write_json(prefix + ".json", {"seeds": args.seeds, "tome_r": list(cfg.tome_r), "rows": rows,
                                         "results": results})


if __name__ == "__main__":
    main()

"""The training-free token reducers of the field at matched FLOPs: speed-up against their FLOPs ratio.

Times, side by side in ONE process (interleaved rounds, the same random batch, :func:`tokentune.timing.measure_throughput`),
the dense model, ToMe and every registered method with ``training_free=True`` and a ``rate_option``
(asked through the registry, never by name: PiToMe, ToFu, and whatever registers later), plus any
``--specs``, at two matched FLOPs points on ViT-B/16 (224 px, random weights: speed does not depend on
them), fp32, batch 16 and batch-1 latency:

* ``tokens:11``: ToMe's reference "low" schedule ([16] * 11 + [10], 8.77 GMACs);
* ``flops:3.46:geometric``: the FLOPs of ToMe's reference "high" schedule (5.07 GMACs), geometric profile.

Every method gets the same target string through its rate option, so methods that resolve targets
with ToMe's schedules run at equal token counts to ToMe. Goal: speed-up >= 0.95 x FLOPs ratio at
batch 16; training-free methods cost <= 3% more time than ToMe at equal token counts ("time / ToMe").

Prints a markdown table, writes benchmarks/results/field_speed[_TAG].{md,json}.

    python benchmarks/field_speed.py                      # ViT-B/16, 2 threads, batch 16 and 1
    python benchmarks/field_speed.py --specs "lora+pitome:r=0.9,label=PiToMe 0.9" --tag run2
    python benchmarks/field_speed.py --quick              # tiny width, seconds (checks the script)
"""
from __future__ import annotations

import argparse
import os
from typing import Dict, List

import torch

from tokentune import create_model, deploy
from tokentune.core.flops import count_flops
from tokentune.core.method import available_methods, get_method
from tokentune.errors import TokenTuneError
from tokentune.fileio import atomic_write_json, atomic_write_text
from tokentune.methods.tome import ViTDims, named_schedule, vit_flops
from tokentune.timing import measure_throughput
from tokentune.tools import measure as measure_env
from tokentune.tools.bench import Candidate, parse_config

GOAL = 0.95
TIME_GOAL = 1.03


def loadavg() -> str:
    return " ".join(open("/proc/loadavg").read().split()[:3]) if os.path.exists("/proc/loadavg") else ""


def default_targets(model: str) -> List[str]:
    """ToMe low's token count and ToMe high's FLOPs ratio (the issue's 8.77 and ~5 GMACs points on ViT-B/16)."""
    dims = ViTDims.from_name(model)
    high = vit_flops(dims) / vit_flops(dims, named_schedule("vit_base_patch16_224", "high", dims.depth))
    return ["tokens:11", f"flops:{high:.3f}:geometric"]


def rate_methods() -> List[str]:
    """ToMe first, then every other training-free method with a rate option, in registry order."""
    names = [n for n in available_methods() if get_method(n).training_free and get_method(n).rate_option]
    return sorted(names, key=lambda n: n != "tome")


def candidates(targets: List[str], specs: List[str]) -> List[Candidate]:
    rows = [Candidate(label="dense", method="linear")]
    for target in targets:
        for name in rate_methods():
            rows.append(Candidate(label=f"{name} @ {target}", method=name,
                                  options={f"{name}_{get_method(name).rate_option}": target}))
        for spec in specs:
            cand = parse_config(spec)
            for m in cand.method.split("+"):
                option = get_method(m).rate_option
                if option and f"{m}_{option}" not in cand.options:
                    cand.options[f"{m}_{option}"] = target
            cand.label = f"{cand.label} @ {target}"
            rows.append(cand)
    return rows


def table(rows: List[Dict], targets: List[str]) -> List[Dict]:
    out = []
    for r in rows:
        target = next((t for t in targets if r["label"].endswith(f"@ {t}")), "")
        tome = next((x for x in rows if x["label"] == f"tome @ {target}"), None) if target else None
        ratio = r["flops_ratio"] or 1.0
        out.append({
            "row": r["label"], "tokens out": r.get("tokens_out"), "GMACs": round(r["gmacs"], 3),
            "FLOPs ratio": round(ratio, 3),
            "b16 speed-up": round(r["speedup"], 3), "b16 speed-up / FLOPs ratio": round(r["speedup"] / ratio, 3),
            f"b16 >= {GOAL}": "" if r["label"] == "dense" else ("yes" if r["speedup"] / ratio >= GOAL else "no"),
            "b16 time / ToMe": round(tome["img_per_s"] / r["img_per_s"], 3) if tome else None,
            "b1 speed-up": round(r["latency_speedup"], 3) if r.get("latency_speedup") else None,
            "b1 speed-up / FLOPs ratio": round(r["latency_speedup"] / ratio, 3) if r.get("latency_speedup") else None,
        })
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_base_patch16_224")
    ap.add_argument("--targets", default=None, help="comma-free list separated by ';' of rate targets "
                                                   "[default: tokens:11;flops:<ToMe high>:geometric]")
    ap.add_argument("--specs", action="append", default=[],
                    help="extra rows, 'tokentune bench --config' syntax; their rate option gets each target")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--latency-iters", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="tiny width, 1 round: checks the script runs")
    ap.add_argument("--tag", default="", help="suffix of the result files' names")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    targets = args.targets.split(";") if args.targets else default_targets(args.model)
    kw = dict(embed_dim=64, num_heads=2) if args.quick else {}
    rounds = 1 if args.quick else args.rounds
    models, flops, tokens = {}, {}, {}
    probe = torch.randn(1, 3, 224, 224)
    for cand in candidates(targets, args.specs):
        torch.manual_seed(0)
        try:
            model = create_model(args.model, method=cand.method, num_classes=1000, **kw, **cand.options).eval()
        except TokenTuneError as exc:       # a method whose rate option does not take this target form
            print(f"{cand.label}: skipped ({exc})", flush=True)
            continue
        with torch.no_grad():
            tokens[cand.label] = int(model(probe, return_tokens=True)[1].shape[1])
        models[cand.label] = deploy(model)
        flops[cand.label] = count_flops(models[cand.label], probe)
        print(f"{cand.label}: {flops[cand.label] / 2e9:.2f} GMACs, {tokens[cand.label]} tokens out", flush=True)
    load_before = loadavg()
    b16 = measure_throughput(models, batch_size=args.batch_size, image_size=224, rounds=rounds, warmup=1)
    b1 = measure_throughput(models, batch_size=1, image_size=224, rounds=rounds, warmup=1, iters_per_round=args.latency_iters)
    raw = [{"label": n, "tokens_out": tokens[n], "gmacs": flops[n] / 2e9, "flops_ratio": flops["dense"] / flops[n],
            "img_per_s": b16[n].median, "img_per_s_low": b16[n].low, "img_per_s_high": b16[n].high,
            "speedup": b16[n].median / b16["dense"].median, "latency_speedup": b1[n].median / b1["dense"].median,
            "b1_img_per_s": b1[n].median} for n in models]
    rows = table(raw, targets)
    env = measure_env.environment(torch.device("cpu"), "fp32")
    env["load before"], env["load after"] = load_before, loadavg()
    title = (f"Training-free token reducers at matched FLOPs: {args.model}, 224 px, fp32, batch {args.batch_size} "
             f"and 1, {torch.get_num_threads()} threads, {rounds} interleaved rounds"
             + (" [QUICK]" if args.quick else ""))
    md = (f"## {title}\n\nEnvironment: {', '.join(f'{k}={v}' for k, v in env.items())}\n\n"
          f"{measure_env.markdown_table(rows, list(rows[0]))}\n")
    print(md)
    os.makedirs(args.out, exist_ok=True)
    prefix = os.path.join(args.out, "field_speed" + (f"_{args.tag}" if args.tag else "") + ("_quick" if args.quick else ""))
    atomic_write_text(prefix + ".md", md)
    atomic_write_json(prefix + ".json", {"title": title, "environment": env, "targets": targets, "rows": rows,
                                         "raw": raw, "goal": GOAL, "time_goal": TIME_GOAL})


if __name__ == "__main__":
    main()

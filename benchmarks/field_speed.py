"""The training-free token reducers of the field at matched FLOPs: speed-up against their FLOPs ratio.

Times, side by side in ONE process (interleaved rounds, the same random batch, :func:`tokentune.timing.measure_throughput`),
the dense model, ToMe and every registered method with ``training_free=True`` and a ``rate_option``
(asked through the registry, never by name: PiToMe, ToFu, and whatever registers later), plus any
``--specs``, at two matched FLOPs points on ViT-B/16 (224 px, random weights: speed does not depend on
them), fp32, batch 16 and batch-1 latency:

* ``flops:2.001``: the FLOPs ratio of ToMe's reference "low" schedule (rounded down, so that ToMe's
  constant schedule at it is "low" itself, [16] * 11 + [10], 8.77 GMACs);
* ``flops:3.462:geometric``: the FLOPs of ToMe's reference "high" schedule (5.07 GMACs), geometric profile.

Every method gets the same target through its rate option, resolved by its own FLOPs count, so methods
that resolve targets with ToMe's schedules run at equal token counts to ToMe, the others (EViT, MCTF,
DTEM) at equal FLOPs. A profile the method's rate does not take (``Method.rate_profiles``: EViT's one
keep rate at fixed blocks has none) is dropped from its target; a target out of a method's reach is
listed under the table with the method's one-line reason. Goal: speed-up >= 0.95 x FLOPs ratio at
batch 16; training-free methods cost <= 3% more time than ToMe at equal token counts ("time / ToMe").
The "paired" columns take the median over rounds of each round's own ratio
(:func:`tokentune.timing.paired_speedup`), which a drift of a shared machine longer than one round
does not move; the others divide the two medians.

Prints a markdown table, writes benchmarks/results/field_speed[_TAG].{md,json}.

    python benchmarks/field_speed.py                      # ViT-B/16, 2 threads, batch 16 and 1
    python benchmarks/field_speed.py --specs "lora+pitome:r=0.9,label=PiToMe 0.9" --tag run2
    python benchmarks/field_speed.py --quick              # tiny width, seconds (checks the script)
    python benchmarks/field_speed.py --methods pitome,tofu --rounds 8   # fewer rows, more rounds
    python benchmarks/field_speed.py --no-timing          # tokens and GMACs of every row only
    python benchmarks/field_speed.py --specs "evit:evit_locations=2,5,8,label=evit (blocks 2 5 8)"
"""
from __future__ import annotations

import argparse
import math
import os
from typing import Dict, List, Tuple

import torch

from tokentune import create_model, deploy
from tokentune.core.flops import count_flops
from tokentune.core.method import available_methods, get_method
from tokentune.errors import TokenTuneError
from tokentune.fileio import atomic_write_json, atomic_write_text
from tokentune.methods.tome import ViTDims, named_schedule, vit_flops
from tokentune.methods.tome.schedules import parse_target
from tokentune.timing import measure_throughput, paired_speedup
from tokentune.tools import measure as measure_env
from tokentune.tools.bench import Candidate, parse_config

GOAL = 0.95
TIME_GOAL = 1.03


def loadavg() -> str:
    return " ".join(open("/proc/loadavg").read().split()[:3]) if os.path.exists("/proc/loadavg") else ""


def default_targets(model: str) -> List[str]:
    """ToMe low's and ToMe high's FLOPs ratios (the issue's 8.77 and ~5 GMACs points on ViT-B/16); low rounded
    down so that ToMe's constant schedule at it is "low" itself, high as in the earlier runs of this script."""
    dims = ViTDims.from_name(model)
    low, high = (vit_flops(dims) / vit_flops(dims, named_schedule("vit_base_patch16_224", name, dims.depth))
                 for name in ("low", "high"))
    return [f"flops:{math.floor(low * 1000) / 1000:.3f}", f"flops:{high:.3f}:geometric"]


def method_target(name: str, target: str) -> str:
    """``target`` as ``name``'s rate option takes it: a schedule profile its rate has no use for
    (not in :attr:`Method.rate_profiles`) is dropped, the FLOPs or token point kept."""
    parsed = parse_target(target)
    if parsed is None or len(target.split(":")) < 3 or parsed[2] in get_method(name).rate_profiles:
        return target
    return ":".join(target.split(":")[:2])


def rate_methods(only: str = "") -> List[str]:
    """ToMe first, then every other training-free method with a rate option, in registry order (only
    those named in the comma-separated ``only``, when given; ToMe is always kept: rows compare with it)."""
    names = [n for n in available_methods() if get_method(n).training_free and get_method(n).rate_option]
    if only:
        wanted = {"tome", *only.split(",")}
        unknown = wanted - set(names)
        if unknown:
            raise SystemExit(f"--methods: {', '.join(sorted(unknown))} not a training-free method with a rate; "
                             f"choose from {', '.join(names)}")
        names = [n for n in names if n in wanted]
    return sorted(names, key=lambda n: n != "tome")


def candidates(targets: List[str], specs: List[str], only: str = "") -> List[Tuple[Candidate, str]]:
    """(row, its point) for every method and spec at every target; a row whose method took the target in
    another form (a dropped profile) says so in its label."""
    rows = [(Candidate(label="dense", method="linear"), "")]
    for target in targets:
        for name in rate_methods(only):
            given = method_target(name, target)
            label = f"{name} @ {target}" + (f" (as {given})" if given != target else "")
            rows.append((Candidate(label=label, method=name,
                                   options={f"{name}_{get_method(name).rate_option}": given}), target))
        for spec in specs:
            cand = parse_config(spec)
            for m in cand.method.split("+"):
                option = get_method(m).rate_option
                if option and f"{m}_{option}" not in cand.options:
                    cand.options[f"{m}_{option}"] = method_target(m, target)
            cand.label = f"{cand.label} @ {target}"
            rows.append((cand, target))
    return rows


def table(rows: List[Dict]) -> List[Dict]:
    out = []
    for r in rows:
        tome = next((x for x in rows if x["label"] == f"tome @ {r['point']}"), None) if r["point"] else None
        ratio = r["flops_ratio"] or 1.0
        if "speedup" not in r:                  # --no-timing
            out.append({"row": r["label"], "tokens out": r.get("tokens_out"), "GMACs": round(r["gmacs"], 3),
                        "FLOPs ratio": round(ratio, 3)})
            continue
        out.append({
            "row": r["label"], "tokens out": r.get("tokens_out"), "GMACs": round(r["gmacs"], 3),
            "FLOPs ratio": round(ratio, 3),
            "b16 speed-up": round(r["speedup"], 3), "b16 speed-up / FLOPs ratio": round(r["speedup"] / ratio, 3),
            f"b16 >= {GOAL}": "" if r["label"] == "dense" else ("yes" if r["speedup"] / ratio >= GOAL else "no"),
            "b16 time / ToMe": round(tome["img_per_s"] / r["img_per_s"], 3) if tome else None,
            "b16 paired speed-up / FLOPs ratio": round(r["speedup_paired"] / ratio, 3),
            "b16 paired time / ToMe": round(r["time_vs_tome_paired"], 3) if r.get("time_vs_tome_paired") else None,
            "b1 speed-up": round(r["latency_speedup"], 3) if r.get("latency_speedup") else None,
            "b1 speed-up / FLOPs ratio": round(r["latency_speedup"] / ratio, 3) if r.get("latency_speedup") else None,
        })
    return out


def build(args, targets: List[str], kw: Dict) -> Tuple[Dict, List[Dict], List[str]]:
    """Every row built and deployed: (models, their records, the rows skipped with their reason)."""
    models, records, skipped = {}, [], []
    probe = torch.randn(1, 3, 224, 224)
    for cand, point in candidates(targets, args.specs, args.methods):
        torch.manual_seed(0)
        try:
            model = create_model(args.model, method=cand.method, num_classes=1000, **kw, **cand.options).eval()
        except TokenTuneError as exc:       # a target out of the method's reach: its one-line reason
            print(f"{cand.label}: skipped ({exc})", flush=True)
            skipped.append(f"{cand.label}: {exc}")
            continue
        with torch.no_grad():
            tokens = int(model(probe, return_tokens=True)[1].shape[1])
        models[cand.label] = deploy(model)
        flops = count_flops(models[cand.label], probe)
        records.append({"label": cand.label, "point": point, "tokens_out": tokens, "flops": flops})
        print(f"{cand.label}: {flops / 2e9:.2f} GMACs, {tokens} tokens out", flush=True)
    dense = next(r["flops"] for r in records if r["label"] == "dense")
    for r in records:
        r["gmacs"], r["flops_ratio"] = r["flops"] / 2e9, dense / r["flops"]
    return models, records, skipped


def time_rows(args, models: Dict, records: List[Dict], rounds: int) -> None:
    """Batch-16 throughput and batch-1 latency of every row, side by side (added to ``records``)."""
    b16 = measure_throughput(models, batch_size=args.batch_size, image_size=224, rounds=rounds, warmup=1)
    b1 = measure_throughput(models, batch_size=1, image_size=224, rounds=rounds, warmup=1,
                            iters_per_round=args.latency_iters)
    for r in records:
        n = r["label"]
        tome = f"tome @ {r['point']}" if r["point"] else None
        r.update({"img_per_s": b16[n].median, "img_per_s_low": b16[n].low, "img_per_s_high": b16[n].high,
                  "speedup": b16[n].median / b16["dense"].median, "latency_speedup": b1[n].median / b1["dense"].median,
                  "b1_img_per_s": b1[n].median, "b16_round_seconds": list(b16[n].round_seconds),
                  "speedup_paired": paired_speedup(b16[n], b16["dense"]),
                  "time_vs_tome_paired": 1 / paired_speedup(b16[n], b16[tome]) if tome in b16 else None})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_base_patch16_224")
    ap.add_argument("--targets", default=None, help="comma-free list separated by ';' of rate targets "
                                                   "[default: flops:<ToMe low>;flops:<ToMe high>:geometric]")
    ap.add_argument("--specs", action="append", default=[],
                    help="extra rows, 'tokentune bench --config' syntax; their rate option gets each target")
    ap.add_argument("--methods", default="", help="comma-separated training-free methods to time (default: "
                    "every one with a rate option; ToMe always included), e.g. pitome,tofu")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--latency-iters", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-timing", action="store_true", help="tokens and GMACs only (seconds, no timing)")
    ap.add_argument("--quick", action="store_true", help="tiny width, 1 round: checks the script runs")
    ap.add_argument("--tag", default="", help="suffix of the result files' names")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    targets = args.targets.split(";") if args.targets else default_targets(args.model)
    kw = dict(embed_dim=64, num_heads=2) if args.quick else {}
    rounds = 1 if args.quick else args.rounds
    models, raw, skipped = build(args, targets, kw)
    load_before = loadavg()
    if not args.no_timing:
        time_rows(args, models, raw, rounds)
    rows = table(raw)
    env = measure_env.environment(torch.device("cpu"), "fp32")
    env["load before"], env["load after"] = load_before, loadavg()
    title = (f"Training-free token reducers at matched FLOPs: {args.model}, 224 px, fp32"
             + (", FLOPs only" if args.no_timing else
                f", batch {args.batch_size} and 1, {torch.get_num_threads()} threads, {rounds} interleaved rounds")
             + (" [QUICK]" if args.quick else ""))
    md = (f"## {title}\n\nEnvironment: {', '.join(f'{k}={v}' for k, v in env.items())}\n\n"
          f"{measure_env.markdown_table(rows, list(rows[0]))}\n"
          + "".join(f"\n- not reached: {line}" for line in skipped) + ("\n" if skipped else ""))
    print(md)
    os.makedirs(args.out, exist_ok=True)
    prefix = os.path.join(args.out, "field_speed" + (f"_{args.tag}" if args.tag else "") + ("_quick" if args.quick else ""))
    atomic_write_text(prefix + ".md", md)
    atomic_write_json(prefix + ".json", {"title": title, "environment": env, "targets": targets, "rows": rows,
                                         "raw": raw, "skipped": skipped, "goal": GOAL, "time_goal": TIME_GOAL})


if __name__ == "__main__":
    main()

"""Reproduce the efficiency columns of the PYRA and DyT tables on this machine.

For each backbone (ViT-B/16 and/or ViT-L/16 at 224x224) every row below is built with random
weights (speed does not depend on them), deployed with ``tokentune.deploy`` and timed side by
side in ONE process: interleaved rounds with rotating order on the same random batch
(``tokentune bench``'s engine, :func:`tokentune.bench_cli.measure`). FLOPs are counted on the
real forward of the deployed model (attention included).

Rows (ViT-L in brackets):

* PYRA table (paper: ViT-B/ViT-L img/s; its speed-ups are relative to its LoRA row):
  LoRA (rank 8 [12]), ToMe low, PYRA low, DiffRate low, small-model LoRA (ViT-S/16 rank 4
  [ViT-B/16 rank 8]), ToMe high, PYRA high. "low"/"high" are the reference merge schedules;
  DiffRate low is LoRA + the DiffRate reference's ImageNet rates with ToMe low's FLOPs
  (deit_base:8.7 [mae_large:31.0]: 8.73 [31.0] GMACs vs ToMe low's 8.77 [30.97]).
* DyT table (paper: ViT-B only, V100; it has no dense row, so its speed-ups are relative to its
  AdaptFormer + ToMe row, and its FLOPs ratios to the 17.58 GFLOPs of the dense ViT-B):
  Full + ToMe, AdaptFormer + ToMe (bottleneck 8 = the table's 0.16M parameters), DyT r=0.5 for
  every dispatch variant (MLP = the paper's DyT; Attn, Attn-MLP, Layer), DyT r=0.5 + ToMe.
  ToMe r = 8 per block on ViT-B (our reading: it gives the table's 13.12 GFLOPs for Full + ToMe);
  r = 4 on ViT-L (no published DyT numbers; the same FLOPs ratio, 0.75, as r = 8 on ViT-B).
  DyT adapters: bottleneck 8. Untrained dispatchers are calibrated to activate 50% of the patch
  tokens of the timed batch (tokentune.dyt.calibrate_activation).
  The token-pruning baselines of DyT's Table 5 at their papers' keep rates: DynamicViT (rho 0.7,
  full fine-tuning: the prediction modules and every backbone weight train), DynamicViT +
  AdaptFormer, EViT (keep rate 0.7 with fusion, full), EViT + AdaptFormer (bottleneck 8).

Our columns: GMACs (the papers' "GFLOPs"), FLOPs ratio and speed-up vs our LoRA row (deployed
LoRA = the plain timm ViT with fused SDPA), img/s (median, min-max); beside them the paper's
img/s/GFLOPs, which row the paper's ratio is relative to, the paper's speed-up, and ours
relative to the same row. Writes ``benchmarks/results/reproduce_<model>_b<batch>[_quick].{md,json}``
after each backbone.

    python benchmarks/reproduce_tables.py                        # ViT-B/16, batch 16, fp32, CPU
    python benchmarks/reproduce_tables.py --models vit_b,vit_l   # both tables (ViT-L takes ~3-4x longer)
    python benchmarks/reproduce_tables.py --quick                # tiny widths, seconds: checks the script
    python benchmarks/reproduce_tables.py --rows evit,dynamicvit # some rows (and the baselines they need)
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from tokentune.fileio import atomic_write_json, atomic_write_text
from tokentune.tools import measure as bench
from tokentune.tools.bench import BenchSettings, measure, parse_config

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

BACKBONES = {
    "vit_b": dict(name="ViT-B/16", model="vit_base_patch16_224", rank=8, small="vit_small_patch16_224",
                  small_name="ViT-S/16", small_rank=4, tome_r=8),
    "vit_l": dict(name="ViT-L/16", model="vit_large_patch16_224", rank=12, small="vit_base_patch16_224",
                  small_name="ViT-B/16", small_rank=8, tome_r=4),
}
# --quick: the same architectures (depth, patch size, tokens: the named schedules fit) at tiny widths
QUICK = {"base": dict(embed_dim=64, num_heads=2), "small": dict(embed_dim=32, num_heads=1)}

# Published throughput (img/s) of the PYRA table; its speed-ups are relative to its LoRA row.
PYRA_PAPER = {
    "vit_b": {"lora": 425, "tome_low": 753, "pyra_low": 745, "small": 1350, "tome_high": 1381, "pyra_high": 1365},
    "vit_l": {"lora": 130, "tome_low": 227, "pyra_low": 225, "small": 425, "tome_high": 431, "pyra_high": 427},
}
PYRA_PAPER["vit_b"]["diffrate_low"], PYRA_PAPER["vit_l"]["diffrate_low"] = 709, 221
# Published DyT seed table (ViT-B/16, V100): img/s, GFLOPs (= GMACs) and trainable parameters (M);
# no dense row in the table, so its speed-ups are relative to AdaptFormer + ToMe; its GFLOPs ratios
# to the dense 17.58.
DYT_PAPER = {
    "vit_b": {"full_tome": (989.29, 13.12, 85.80), "adapter_tome": (941.70, 13.29, 0.16),
              "dyt_mlp": (912.39, 12.54, 0.16), "dyt_tome": (1114.70, 9.85, 0.16),
              "dynamicvit": (1010.40, 14.05, 88.70), "dynamicvit_adapter": (954.82, 14.23, 3.10),
              "evit": (1233.45, 11.62, 85.80), "evit_adapter": (1152.38, 11.77, 0.16)},
}
DIFFRATE_LOW = {"vit_b": "deit_base:8.7", "vit_l": "mae_large:31.0"}
DYT_DENSE_GFLOPS = 17.58
DYT_BASELINE = "adapter_tome"


@dataclass
class Row:
    key: str
    label: str
    config: str
    small: bool = False


def rows_for(backbone: str) -> List[Row]:
    b = BACKBONES[backbone]
    rank, r = b["rank"], b["tome_r"]
    dyt = "dyt_bottleneck=8,rate=0.5"
    return [
        Row("lora", "LoRA", f"lora:lora_rank={rank}"),
        Row("tome_low", "ToMe (low)", f"lora+tome:tome_r=low,lora_rank={rank}"),
        Row("pyra_low", "PYRA (low)", f"pyra:tome_r=low,lora_rank={rank}"),
        Row("diffrate_low", "DiffRate (low)", f"lora+diffrate:diffrate_preset={DIFFRATE_LOW[backbone]},lora_rank={rank}"),
        Row("small", f"small-model LoRA ({b['small_name']})", f"lora:model={b['small']},lora_rank={b['small_rank']}",
            small=True),
        Row("tome_high", "ToMe (high)", f"lora+tome:tome_r=high,lora_rank={rank}"),
        Row("pyra_high", "PYRA (high)", f"pyra:tome_r=high,lora_rank={rank}"),
        Row("full_tome", f"Full + ToMe (r={r})", f"full+tome:tome_r={r}"),
        Row("adapter_tome", f"AdaptFormer + ToMe (r={r})", f"adapter+tome:tome_r={r},adapter_bottleneck=8"),
        Row("dyt_mlp", "DyT r=0.5 (MLP Dispatch)", f"dyt:{dyt}"),
        Row("dyt_attn", "DyT r=0.5 (Attn Dispatch)", f"dyt:dyt_variant=attn,{dyt}"),
        Row("dyt_attn_mlp", "DyT r=0.5 (Attn-MLP Dispatch)", f"dyt:dyt_variant=attn_mlp,{dyt}"),
        Row("dyt_layer", "DyT r=0.5 (Layer Dispatch)", f"dyt:dyt_variant=layer,{dyt}"),
        Row("dyt_tome", f"DyT r=0.5 + ToMe (r={r})", f"dyt+tome:tome_r={r},{dyt}"),
        Row("dynamicvit", "DynamicViT (rho 0.7)", "dynamicvit:dynamicvit_keep_rate=0.7"),
        Row("dynamicvit_adapter", "DynamicViT + AdaptFormer", "adapter+dynamicvit:dynamicvit_keep_rate=0.7,adapter_bottleneck=8"),
        Row("evit", "EViT (keep 0.7)", "evit:evit_keep_rate=0.7"),
        Row("evit_adapter", "EViT + AdaptFormer", "adapter+evit:evit_keep_rate=0.7,adapter_bottleneck=8"),
    ]


def select_rows(specs: List[Row], keys: Optional[str]) -> List[Row]:
    """The rows named in ``keys`` (comma-separated), plus the baselines their ratios need (LoRA first)."""
    if not keys:
        return specs
    wanted = {k.strip() for k in keys.split(",") if k.strip()}
    unknown = wanted - {s.key for s in specs}
    if unknown:
        raise SystemExit(f"--rows: unknown {', '.join(sorted(unknown))}; choose from {', '.join(s.key for s in specs)}")
    wanted.add("lora")
    if wanted & set(DYT_PAPER.get("vit_b", {})):
        wanted.add(DYT_BASELINE)
    return [s for s in specs if s.key in wanted]


def _paper(backbone: str, key: str, ours: Dict[str, dict]) -> Dict[str, object]:
    """The paper's numbers for one row, its baseline, and our ratio against the same baseline."""
    out: Dict[str, object] = {"paper img/s": None, "paper GFLOPs": None, "paper FLOPs ratio": None,
                              "paper trainable (M)": None, "paper baseline": "", "paper speed-up": None,
                              "ours vs paper baseline": None}
    pyra = PYRA_PAPER.get(backbone, {})
    dyt = DYT_PAPER.get(backbone, {})
    if key in pyra:
        out.update({"paper img/s": pyra[key], "paper baseline": f"LoRA ({pyra['lora']} img/s)",
                    "paper speed-up": pyra[key] / pyra["lora"],
                    "ours vs paper baseline": ours[key]["img_per_s"] / ours["lora"]["img_per_s"]})
    elif key in dyt:
        ips, gflops, params = dyt[key]
        base_ips = dyt[DYT_BASELINE][0]
        out.update({"paper img/s": ips, "paper GFLOPs": gflops, "paper FLOPs ratio": DYT_DENSE_GFLOPS / gflops,
                    "paper trainable (M)": params,
                    "paper baseline": f"AdaptFormer + ToMe ({base_ips:.2f} img/s)",
                    "paper speed-up": ips / base_ips,
                    "ours vs paper baseline": ours[key]["img_per_s"] / ours[DYT_BASELINE]["img_per_s"]})
    return out


def _fmt(v, spec):
    return "" if v is None else format(v, spec)


def table(backbone: str, specs: List[Row], result) -> List[Dict[str, object]]:
    ours = {spec.key: row for spec, row in zip(specs, result.rows)}
    rows = []
    for spec, row in zip(specs, result.rows):
        p = _paper(backbone, spec.key, ours)
        rows.append({
            "row": spec.label, "config": spec.config,
            "trainable % (paper count)": row["paper_pct"], "trainable (M)": row["paper_trainable"] / 1e6,
            "tokens": f"{row['tokens_in']}->{row['tokens_out']}",
            "active": row["activation"], "GMACs": row["gmacs"], "FLOPs ratio vs LoRA": row["flops_ratio"],
            "img/s": row["img_per_s"], "img/s min-max": f"{row['img_per_s_low']:.2f}-{row['img_per_s_high']:.2f}",
            "speed-up vs LoRA": row["speedup"], **p,
        })
    return rows


COLUMNS = ["row", "trainable %", "trainable (M)", "tokens", "active", "GMACs", "FLOPs ratio vs LoRA", "img/s",
           "img/s min-max", "speed-up vs LoRA", "paper trainable (M)", "paper GFLOPs", "paper FLOPs ratio",
           "paper img/s", "paper baseline", "paper speed-up", "ours vs paper baseline"]


def markdown(backbone: str, rows: List[Dict[str, object]], result, quick: bool) -> str:
    shown = []
    for r in rows:
        shown.append({
            "row": r["row"], "trainable %": _fmt(r["trainable % (paper count)"], ".3f"),
            "trainable (M)": _fmt(r["trainable (M)"], ".2f"), "tokens": r["tokens"],
            "active": "" if r["active"] is None else f"{100 * r['active']:.1f}%",
            "GMACs": f"{r['GMACs']:.2f}", "FLOPs ratio vs LoRA": f"{r['FLOPs ratio vs LoRA']:.2f}x",
            "img/s": f"{r['img/s']:.2f}", "img/s min-max": r["img/s min-max"],
            "speed-up vs LoRA": f"{r['speed-up vs LoRA']:.2f}x",
            "paper trainable (M)": _fmt(r["paper trainable (M)"], ".2f"), "paper GFLOPs": _fmt(r["paper GFLOPs"], ".2f"),
            "paper FLOPs ratio": _fmt(r["paper FLOPs ratio"], ".2f") + ("x" if r["paper FLOPs ratio"] else ""),
            "paper img/s": _fmt(r["paper img/s"], "g"), "paper baseline": r["paper baseline"],
            "paper speed-up": _fmt(r["paper speed-up"], ".2f") + ("x" if r["paper speed-up"] else ""),
            "ours vs paper baseline": (_fmt(r["ours vs paper baseline"], ".2f")
                                       + ("x" if r["ours vs paper baseline"] else "")),
        })
    env = ", ".join(f"{k}={v}" for k, v in result.environment.items())
    b = BACKBONES[backbone]
    title = (f"Paper tables on this machine: {b['name']} {result.settings['image_size']}px, batch "
             f"{result.settings['batch_size']}, {result.settings['dtype']}, {result.settings['device']}, "
             f"{result.settings['rounds']} interleaved rounds, all models deployed"
             + (" [QUICK: tiny widths, NOT a measurement]" if quick else ""))
    commands = "\n".join(f"    --config \"{r['config']}\"" for r in rows)
    notes = f"""
Columns: GMACs = multiply-adds per image of the deployed model (the papers' "GFLOPs"; attention
counted), FLOPs ratio and speed-up relative to our LoRA row (the plain timm ViT with fused SDPA),
img/s median over the rounds (min-max beside). "paper speed-up" is the paper's img/s over the
paper's own baseline row ("paper baseline"): the PYRA table's LoRA row; the DyT table has no dense
row, so its rows are relative to AdaptFormer + ToMe and its FLOPs ratio is 17.58 / GFLOPs (dense
ViT-B). "ours vs paper baseline" is our img/s over our row of that same baseline. The papers timed
on GPUs (DyT: V100, fp16, batch 128; PYRA: batch 512, fp32, GPU not stated); absolute img/s are
not comparable across machines, the ratios are. DyT rows: untrained dispatchers calibrated to
activate 50% of the patch tokens of the timed batch ("active" = the rate measured there); Full +
ToMe / AdaptFormer + ToMe / DyT + ToMe merge r={b['tome_r']} tokens per block. trainable (M): the paper count (backbone
without head; DynamicViT/EViT rows fine-tune every weight, as in the papers).

Each row again with `tokentune bench --model {b['model']} --batch-size {result.settings['batch_size']}`:
{commands}
"""
    return f"## {title}\n\nEnvironment: {env}\n\n{bench.markdown_table(shown, COLUMNS)}\n{notes}"


def loadavg() -> str:
    """The 1/5/15-minute load averages (other processes share the CPU: quoted beside every timing)."""
    return " ".join(open("/proc/loadavg").read().split()[:3]) if os.path.exists("/proc/loadavg") else ""


def run_backbone(backbone: str, args) -> str:
    b = BACKBONES[backbone]
    specs = select_rows(rows_for(backbone), args.rows)
    candidates = []
    for spec in specs:
        cand = parse_config(spec.config)
        cand.label = spec.label
        if args.quick:
            cand.timm_kwargs.update(QUICK["small" if spec.small else "base"])
        candidates.append(cand)
    settings = BenchSettings(model=b["model"], image_size=224, batch_size=args.batch_size, dtype=args.dtype,
                             device=args.device, rounds=args.rounds, warmup=args.warmup, latency=False,
                             memory=False, train=False, seed=args.seed)
    start = time.perf_counter()
    load_before = loadavg()
    print(f"{b['name']}: {len(candidates)} models, batch {args.batch_size}, {args.warmup} warm-up + {args.rounds} "
          f"interleaved rounds", file=sys.stderr, flush=True)
    result = measure(candidates, settings, progress=lambda t: print(f"  {b['name']} {t}", file=sys.stderr, flush=True))
    result.environment["load before"], result.environment["load after"] = load_before, loadavg()
    rows = table(backbone, specs, result)
    md = markdown(backbone, rows, result, args.quick)
    prefix = os.path.join(args.out, f"reproduce_{backbone}_b{args.batch_size}{'_quick' if args.quick else ''}"
                                    f"{'_rows' if args.rows else ''}")

    atomic_write_text(prefix + ".md", md)
    atomic_write_json(prefix + ".json", {
        "title": f"{b['name']} paper tables", "quick": args.quick, "environment": result.environment,
        "settings": result.settings, "rows": rows, "bench_rows": result.rows,
        "paper": {"pyra_img_per_s": PYRA_PAPER.get(backbone), "dyt_img_per_s_gflops": DYT_PAPER.get(backbone),
                  "dyt_dense_gflops": DYT_DENSE_GFLOPS, "pyra_baseline": "lora", "dyt_baseline": DYT_BASELINE}})
    print(f"{b['name']} done in {time.perf_counter() - start:.0f} s: {prefix}.md, {prefix}.json", file=sys.stderr)
    return md


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="vit_b", help="comma-separated: vit_b, vit_l [default: vit_b]")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=10, help="timed interleaved rounds [default: 10]")
    ap.add_argument("--warmup", type=int, default=None, help="untimed forwards per model [default: 1 on CPU, 3 on GPU]")
    ap.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N [default: cpu]")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads [default: torch's]")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rows", default=None, help="comma-separated row keys to run (LoRA and the paper baselines they "
                    "are compared with are added) [default: every row]")
    ap.add_argument("--quick", action="store_true", help="tiny widths, batch 2, 2 rounds: checks the script in seconds")
    ap.add_argument("--out", default=RESULTS, help="output directory [default: benchmarks/results]")
    args = ap.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in BACKBONES]
    if unknown or not models:
        ap.error(f"--models: unknown {', '.join(unknown) or '(empty)'}; choose from {', '.join(BACKBONES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.warmup is None:
        args.warmup = 3 if args.device.startswith("cuda") else 1
    if args.quick:
        args.batch_size, args.rounds, args.warmup = 2, 2, 1
    for backbone in models:
        print(run_backbone(backbone, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())

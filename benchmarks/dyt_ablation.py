"""DyT ablation on the offline demo's real data: what costs DyT accuracy on a small budget.

Every row adapts the demo's tiny pre-trained ViT (``tokentune demo``: 4 blocks, width 64, 64
patches + CLS, pre-trained from scratch on scikit-learn's digits 0-4) to the held-back digits 5-9
(448 training and 448 test images) with the demo's budget (20 epochs, batch 32, lr 1e-2, 1 warm-up
epoch) through ``tokentune.tools.demo.adapt`` (``create_model -> train -> deploy -> evaluate``),
once per seed and data seed. A *seed* sets the new layers' initialisation, the data order, dropout
and DyT's Gumbel noise. A *data seed* is the demo's own seed: its train/test split of the digits
and its pre-trained backbone (data seed 0 is the demo's). Rows: the plain adapter of the same size,
DyT at r = 1.0 / 0.7 / 0.5, the reference loss without its complete-model CE and/or KL, a decaying
temperature, calibrated dispatcher biases, no Gumbel noise, ``keep_layers`` 2, the other dispatch
variants, the MoE-adapter, a CLS-token head, and the small-data options (all-active warm-up, rate
warm-up, and both in turn).

Reported per row: test top-1 of the deployed model (mean ± sample std over seeds, per data seed),
the paired difference to the reference DyT row (same seed and data seed) and on how many pairs the
row beats it, multiply-adds per image (torch's FLOP counter on the whole test set: they follow the
activation), the activation rate at inference (per dispatcher and overall, on the test set), the
rate of the Gumbel-noised training masks in the last epoch, how often a training mask agrees with
the inference mask, trainable parameters, training time. Pictures: per-block activation rates
(the DyT paper's Fig. 5), one per data seed, and which patches a model activates in every block
for one test digit of each class (its Fig. 6).

Runs ``--workers`` processes with one thread each (default 2: the grid on a 2-core CPU); every job
seeds itself, so the numbers do not depend on the worker count or order. The default grid (18 rows x
3 seeds = 54 jobs) takes about 1,300 s of CPU time on a 2-core x86 VM: about 11 minutes of wall
time on two idle cores (24 minutes when other processes kept the load average at 4-5.5).

Limits: one small task (5 classes, 448 training images) on a 4-block, width-64 backbone
pre-trained on 721 images, 20 epochs; one test image is 0.22 points of top-1 and the seed-to-seed
spread is mostly 1-5 points, so with 3 seeds a difference under about 2 points is not resolved; and the
activation rates of a 4-block model are not those of ViT-B's 12 blocks.

    python benchmarks/dyt_ablation.py                       # the grid: data seed 0, seeds 0,1,2
    python benchmarks/dyt_ablation.py --data-seeds 0,1      # and a second split/backbone (twice the time)
    python benchmarks/dyt_ablation.py --seeds 0,1,2,3,4 --rows adapter,ref,r1.0
    python benchmarks/dyt_ablation.py --rows adapter64,dyt64 --data-seeds 0,1   # rows outside the grid: adapter 64
    python benchmarks/dyt_ablation.py --quick               # tiny and short: checks that the script runs
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from tokentune.core.dispatch import ActivationStats, activation_stats, dispatchers
from tokentune.tools.demo import DemoConfig, DemoRow, DemoSetup, adapt, count_macs, prepare_demo
from tokentune.tools.viz.dispatch import plot_activated_tokens, plot_activation_rates

REFERENCE = "ref"
ADAPTER = "adapter"


@dataclass
class Row:
    """One configuration of the grid: a key, a label, the method and its options (``create_model``)."""

    key: str
    label: str
    method: str = "dyt"
    options: Dict[str, Any] = field(default_factory=dict)


ROWS: List[Row] = [
    Row(ADAPTER, "AdaptFormer (adapter 16, no dispatch)", "adapter", {"adapter_bottleneck": 16}),
    Row("r1.0", "DyT r=1.0", options={"dyt_target_rate": 1.0}),
    Row("r0.7", "DyT r=0.7", options={"dyt_target_rate": 0.7}),
    Row(REFERENCE, "DyT r=0.5 (reference defaults)"),
    Row("no-complete", "r=0.5 without the complete-model CE", options={"dyt_complete_weight": 0.0}),
    Row("no-kl", "r=0.5 without the KL", options={"dyt_distill_weight": 0.0}),
    Row("no-both", "r=0.5 without both (complete CE + KL)", options={"dyt_complete_weight": 0.0, "dyt_distill_weight": 0.0}),
    Row("tau-decay", "r=0.5, tau 5 -> 0.5 (exponential)", options={"dyt_tau_end": 0.5, "dyt_tau_schedule": "exponential"}),
    Row("calibrated", "r=0.5, biases calibrated at step 0", options={"dyt_calibrate_init": True}),
    Row("no-noise", "r=0.5 without Gumbel noise", options={"dyt_gumbel_noise": False}),
    Row("keep2", "r=0.5, keep_layers 2 (first two blocks all active)", options={"dyt_keep_layers": 2}),
    Row("layer", "r=0.5, Layer Dispatch", options={"dyt_variant": "layer"}),
    Row("attn-mlp", "r=0.5, Attn-MLP Dispatch", options={"dyt_variant": "attn_mlp"}),
    Row("moe", "r=0.5, MoE-adapter x4", options={"dyt_experts": 4}),
    Row("cls-head", "r=0.5, CLS-token head instead of average pooling", options={"global_pool": "token", "fc_norm": True}),
    Row("active-warmup", "r=0.5, all tokens active for the first 25%", options={"dyt_active_warmup": 0.25}),
    Row("rate-warmup", "r=0.5, rate target 1.0 -> 0.5 over the first 50%", options={"dyt_rate_warmup": 0.5}),
    Row("both-warmups", "r=0.5, all active for 25%, then rate target 1.0 -> 0.5 over 25%",
        options={"dyt_active_warmup": 0.25, "dyt_rate_warmup": 0.25}),
]
#: rows outside the default grid (``--rows``): the adapters' capacity, for the plain adapter and DyT alike
EXTRA_ROWS: List[Row] = [
    Row("adapter64", "AdaptFormer (adapter 64, no dispatch)", "adapter", {"adapter_bottleneck": 64}),
    Row("dyt64", "DyT r=0.5, adapter 64", options={"dyt_bottleneck": 64}),
]
#: rows whose per-block rates are drawn side by side (MLP Dispatch in every block)
RATE_PICTURE_ROWS = ("r1.0", "r0.7", REFERENCE, "cls-head")
#: rows whose model of the first seed and data seed gets a token picture
TOKEN_PICTURE_ROWS = (REFERENCE, "cls-head")


# ----------------------------------------------------------------------------- one job (in a worker)
_SETUP: Dict[str, DemoSetup] = {}


def _init_worker() -> None:
    torch.set_num_threads(1)


def run_job(job: Tuple[DemoSetup, DemoConfig, Row, int, Optional[str]]) -> Dict[str, Any]:
    """Train and measure one (row, seed, data seed); draws the token picture when ``picture`` is a path."""
    setup, cfg, row, seed, picture = job
    cpu = time.process_time()
    setup = _SETUP.setdefault(setup.backbone, setup)        # decode the digits once per process
    done = adapt(setup, DemoRow(row.label, row.method, row.options), cfg, None, seed=seed)
    test = torch.stack([setup.test[i][0] for i in range(len(setup.test))])
    record: Dict[str, Any] = {
        "key": row.key, "data_seed": cfg.seed, "seed": seed, "top1": done.top1, "trainable": done.trainable,
        "train_s": done.train_s, "macs": count_macs(done.deployed, test), "test_images": len(test),
        "last_epoch": done.history[-1] if done.history else {},
    }
    if dispatchers(done.deployed):
        agreement = mask_agreement(done.model, test)
        stats = activation_stats(done.deployed, [test])
        record.update(names=stats.names, per_layer=stats.per_layer, overall=stats.overall,
                      agreement_per_layer=agreement, agreement=sum(agreement) / len(agreement))
        if picture:
            plot_activated_tokens(done.model, digit_files(setup), picture, panel_size=1.6)
    record["cpu_s"] = time.process_time() - cpu
    return record


@torch.no_grad()
def mask_agreement(model: torch.nn.Module, images: torch.Tensor) -> List[float]:
    """Per dispatcher (in module order): how often a training mask agrees with the inference mask.

    A patch token with dispatcher logit ``g`` is active at inference iff ``g > logit(thr)``; in
    training iff ``g + L > tau * logit(thr)`` with logistic noise ``L`` (the two Gumbels), i.e.
    with probability ``sigmoid(g - tau * logit(thr))``. The agreement is the mean over tokens of that
    probability for active tokens and of its complement for inactive ones (1 without noise).
    """
    logits: Dict[torch.nn.Module, torch.Tensor] = {}
    prefix = model.num_prefix_tokens
    hooks = [d.linear.register_forward_hook(lambda m, a, out: logits.__setitem__(m, out[:, prefix:, 0]))
             for d in dispatchers(model)]
    try:
        model.eval()(images, dyt_execution="mask")
    finally:
        for h in hooks:
            h.remove()
    result = []
    for d in dispatchers(model):
        g = logits[d.linear]
        if not d.gumbel_noise:
            result.append(1.0)
            continue
        t = math.log(d.threshold / (1 - d.threshold))
        p_train = torch.sigmoid(g - d.tau * t)
        result.append(float(torch.where(g > t, p_train, 1 - p_train).mean()))
    return result


def digit_files(setup: DemoSetup) -> List[str]:
    """The first test image (in name order) of each class 5-9."""
    root = os.path.join(setup.folders["new"], "test")
    return [os.path.join(root, c, sorted(os.listdir(os.path.join(root, c)))[0]) for c in sorted(os.listdir(root))]


# ----------------------------------------------------------------------------- the grid
def run_grid(cfg: DemoConfig, rows: Sequence[Row], seeds: Sequence[int], data_seeds: Sequence[int], workers: int,
             out: str, pictures: bool, say=print) -> List[Dict[str, Any]]:
    """Every (row, seed, data seed) job, ``workers`` at a time; returns one record per job."""
    workdir = tempfile.mkdtemp(prefix="dyt-ablation-")
    try:
        jobs = []
        for d in data_seeds:
            cfg_d = replace(cfg, seed=d, workdir=os.path.join(workdir, f"data{d}"))
            setup = prepare_demo(cfg_d, cfg_d.workdir, out=say)
            for row in rows:
                for seed in seeds:
                    first = seed == seeds[0] and d == data_seeds[0]
                    picture = f"{out}_tokens_{row.key}.png" if pictures and first and row.key in TOKEN_PICTURE_ROWS else None
                    jobs.append((setup, cfg_d, row, seed, picture))
        return _run_jobs(jobs, workers, say)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _run_jobs(jobs: List[Tuple], workers: int, say) -> List[Dict[str, Any]]:
    # the complete-model pass makes most DyT rows about twice as long as the adapter: longest first
    jobs = sorted(jobs, key=lambda j: (j[2].method != "dyt" or j[2].key == "no-both", j[1].seed, j[2].key, j[3]))
    records = []
    tic = time.perf_counter()
    if workers <= 1:
        _init_worker()
        results = map(run_job, jobs)
    else:
        pool = multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker)
        results = pool.imap_unordered(run_job, jobs)
    for i, rec in enumerate(results, 1):
        records.append(rec)
        say(f"[{i}/{len(jobs)}] {rec['key']} data seed {rec['data_seed']} seed {rec['seed']}: top-1 {rec['top1']:.1f}% "
            f"({rec['train_s']:.0f} s; {time.perf_counter() - tic:.0f} s elapsed)")
    if workers > 1:
        pool.close()
        pool.join()
    return records


# ----------------------------------------------------------------------------- summary
def _std(values: Sequence[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _mean_lists(lists: List[List[float]]) -> List[float]:
    return [statistics.mean(v) for v in zip(*lists)]


def summarize(rows: Sequence[Row], records: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One summary per row: means and spreads over seeds per data seed, paired differences to the
    reference row (same seed and data seed), costs and activation averaged over every run."""
    by_key: Dict[str, Dict[Tuple[int, int], Dict[str, Any]]] = {}
    for r in records:
        by_key.setdefault(r["key"], {})[(r["data_seed"], r["seed"])] = r
    ref = by_key.get(REFERENCE, {})
    adapter_macs = statistics.mean(r["macs"] for r in by_key[ADAPTER].values()) if ADAPTER in by_key else None
    table = []
    for row in rows:
        runs = by_key.get(row.key)
        if not runs:
            continue
        pairs = sorted(runs)
        all_runs = [runs[p] for p in pairs]
        data: Dict[str, Any] = {}
        for d in sorted({p[0] for p in pairs}):
            top1 = [runs[p]["top1"] for p in pairs if p[0] == d]
            data[str(d)] = {"seeds": [p[1] for p in pairs if p[0] == d], "top1": top1,
                            "mean": statistics.mean(top1), "std": _std(top1)}
        s: Dict[str, Any] = {"key": row.key, "label": row.label, "method": row.method, "options": row.options,
                             "data": data, "macs": statistics.mean(r["macs"] for r in all_runs),
                             "trainable": all_runs[0]["trainable"], "test_images": all_runs[0]["test_images"],
                             "train_s": statistics.mean(r["train_s"] for r in all_runs)}
        s["macs_vs_adapter"] = s["macs"] / adapter_macs if adapter_macs else None
        paired = [runs[p]["top1"] - ref[p]["top1"] for p in pairs if p in ref]
        if paired and row.key != REFERENCE:
            s.update(vs_reference=statistics.mean(paired), vs_reference_std=_std(paired),
                     beats_reference=sum(d > 0 for d in paired), ties_reference=sum(d == 0 for d in paired),
                     pairs=len(paired))
        if "per_layer" in all_runs[0]:
            s["names"] = all_runs[0]["names"]
            s["per_layer"] = _mean_lists([r["per_layer"] for r in all_runs])
            s["overall"] = statistics.mean(r["overall"] for r in all_runs)
            for d in data:
                these = [runs[p] for p in pairs if str(p[0]) == d]
                data[d].update(per_layer=_mean_lists([r["per_layer"] for r in these]),
                               overall=statistics.mean(r["overall"] for r in these), images=len(these) * s["test_images"])
            s["agreement"] = statistics.mean(r["agreement"] for r in all_runs)
            train_rates = [r["last_epoch"].get("rate") for r in all_runs]
            s["train_rate"] = statistics.mean(train_rates) if all(v is not None for v in train_rates) else None
        table.append(s)
    return table


def markdown(table: List[Dict[str, Any]], meta: Dict[str, Any]) -> str:
    data_seeds = [str(d) for d in meta["data_seeds"]]
    head = (["row"] + [f"top-1 % data seed {d} (mean ± std)" for d in data_seeds]
            + ["Δ vs DyT r=0.5 (paired, mean ± std)", "beats it", "MMACs/img (vs adapter)",
               "activation at inference: overall [per block]", "training-mask rate", "train/inference mask agreement",
               "trainable", "train s"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in table:
        cells = [s["label"]]
        cells += [f"{s['data'][d]['mean']:.1f} ± {s['data'][d]['std']:.1f}" if d in s["data"] else "" for d in data_seeds]
        cells.append(f"{s['vs_reference']:+.1f} ± {s['vs_reference_std']:.1f}" if "vs_reference" in s else "")
        cells.append(f"{s['beats_reference']}/{s['pairs']}" + (f" ({s['ties_reference']} tied)" if s["ties_reference"] else "")
                     if "beats_reference" in s else "")
        cells.append(f"{s['macs'] / 1e6:.2f}" + (f" ({100 * s['macs_vs_adapter']:.0f}%)" if s.get("macs_vs_adapter") else ""))
        cells.append(f"{s['overall']:.2f} [{' '.join(f'{v:.2f}' for v in s['per_layer'])}]" if "overall" in s else "1 (all)")
        cells.append(f"{s['train_rate']:.2f}" if s.get("train_rate") is not None else "")
        cells.append(f"{s['agreement']:.2f}" if "agreement" in s else "")
        cells += [f"{s['trainable']:,}", f"{s['train_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Top-1 per seed (data seed: seeds in order):", ""]
    for s in table:
        per = "; ".join(f"data {d}: {' '.join(f'{v:.1f}' for v in s['data'][d]['top1'])}" for d in data_seeds if d in s["data"])
        lines.append(f"- {s['label']}: {per}")
    cpu = ", ".join(f"data seed {d}: {v:.0f} s" for d, v in meta["cpu_s"].items())
    lines += ["", f"{meta['seeds_text']}; {meta['budget']}; {meta['machine']}; wall time {meta['wall_s']:.0f} s with "
              f"{meta['workers']} worker process(es) of 1 thread; load average before/after: {meta['load_before']} / "
              f"{meta['load_after']}; CPU time of the jobs ({cpu}): on two otherwise idle cores the wall time is about "
              "half of it, plus the setup."]
    return "\n".join(lines)


def draw_rates(table: List[Dict[str, Any]], out: str) -> List[str]:
    """Per-block inference activation of the MLP-Dispatch rows, averaged over seeds: one picture per
    data seed (the DyT paper's Fig. 5)."""
    paths = []
    for d in sorted({d for s in table for d in s["data"]}):
        series = {s["label"]: ActivationStats(s["names"], s["data"][d]["per_layer"], s["data"][d]["overall"],
                                              s["data"][d]["images"])
                  for s in table if s["key"] in RATE_PICTURE_ROWS and "per_layer" in s.get("data", {}).get(d, {})}
        if series:
            paths.append(plot_activation_rates(series, f"{out}_rates_data{d}.png", size=(8.0, 3.8),
                                               title=f"DyT on digits 5-9, data seed {d}: activation per block "
                                                     "(test set, mean over seeds)"))
    return paths


# ----------------------------------------------------------------------------- main
def _load() -> str:
    try:
        with open("/proc/loadavg") as fh:
            return " ".join(fh.read().split()[:3])
    except OSError:
        return "n/a"


def _ints(text: str) -> List[int]:
    return [int(s) for s in text.split(",")]


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds (default 0,1,2)")
    ap.add_argument("--data-seeds", default="0",
                    help="comma-separated demo seeds: the train/test split of the digits and the pre-trained backbone "
                         "(default 0, the demo's)")
    ap.add_argument("--rows", default=None, help=f"comma-separated row keys (default all of {','.join(r.key for r in ROWS)}; "
                                                 f"more: {','.join(r.key for r in EXTRA_ROWS)})")
    ap.add_argument("--epochs", type=int, default=None, help="adaptation epochs (default: the demo's 20)")
    ap.add_argument("--lr", type=float, default=None, help="adaptation peak learning rate (default: the demo's 1e-2)")
    ap.add_argument("--workers", type=int, default=2, help="worker processes, one thread each (default 2)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "dyt_ablation"),
                    help="output prefix: <out>.json, <out>.md and pictures <out>_*.png")
    ap.add_argument("--no-pictures", action="store_true", help="no pictures (they need matplotlib)")
    ap.add_argument("--quick", action="store_true", help="tiny and short (patch 8, 2 epochs, 1 seed, 3 rows): a smoke test")
    args = ap.parse_args(argv)

    cfg = DemoConfig()
    seeds, data_seeds = _ints(args.seeds), _ints(args.data_seeds)
    keys = args.rows.split(",") if args.rows else [r.key for r in ROWS]
    if args.quick:
        cfg = replace(cfg, pretrain_epochs=2, epochs=2, patch_size=8)
        seeds = seeds[:1]
        keys = args.rows.split(",") if args.rows else [ADAPTER, REFERENCE, "keep2"]
    if args.epochs:
        cfg = replace(cfg, epochs=args.epochs)
    if args.lr:
        cfg = replace(cfg, lr=args.lr)
    every = ROWS + EXTRA_ROWS
    unknown = sorted(set(keys) - {r.key for r in every})
    if unknown:
        raise SystemExit(f"error: unknown row(s) {', '.join(unknown)}; choose from {', '.join(r.key for r in every)}")
    rows = [r for r in every if r.key in keys]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    load_before = _load()
    tic = time.perf_counter()
    records = run_grid(cfg, rows, seeds, data_seeds, args.workers, args.out, not args.no_pictures)
    wall = time.perf_counter() - tic
    table = summarize(rows, records)
    meta = {
        "seeds": seeds, "data_seeds": data_seeds,
        "seeds_text": f"seeds {','.join(map(str, seeds))} x data seeds {','.join(map(str, data_seeds))}",
        "budget": (f"{cfg.epochs} epochs, batch {cfg.batch_size}, lr {cfg.lr:g}; ViT patch {cfg.patch_size} "
                   f"({(32 // cfg.patch_size) ** 2} patches + CLS), width {cfg.embed_dim}, depth {cfg.depth}; fp32"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU(s), torch {torch.__version__}",
        "workers": args.workers, "wall_s": wall, "load_before": load_before, "load_after": _load(),
        "cpu_s": {str(d): sum(r["cpu_s"] for r in records if r["data_seed"] == d) for d in data_seeds},
        "demo_config": asdict(cfg),
    }
    text = markdown(table, meta)
    print(text)
    with open(args.out + ".md", "w") as fh:
        fh.write(text + "\n")
    with open(args.out + ".json", "w") as fh:
        json.dump({"meta": meta, "rows": table, "runs": records}, fh, indent=1, default=float)
    if not args.no_pictures:
        draw_rates(table, args.out)
    return {"meta": meta, "rows": table, "runs": records}


if __name__ == "__main__":
    main()

"""Deployment fast path: ToMe/PYRA, DyT's static-shape (capacity) execution, compiled and ONNX Runtime.

One run (one process) measures, on ViT-B/16 224 fp32 with random weights (speed does not depend on
them), every model side by side in interleaved rounds on the same random batch
(``tokentune.measure_throughput``):

* ``tome``: deployed LoRA (the plain timm ViT with fused SDPA) vs LoRA+ToMe and PYRA at the low and
  high schedules, eager; at batch 1 also ``tokentune.deploy(..., compile=True)`` of LoRA and ToMe.
  A diagnostic row keeps ToMe's token counts but drops the tokens instead of matching and merging
  them (no merge operations, no proportional attention): the speed ToMe would have if merging
  were free, which bounds what cheaper merging can gain.
* ``dyt``: MLP Dispatch at activation 0.5 (dispatchers calibrated on the timed batch): the same
  deployed model with every token active, the threshold rule (data-dependent skipping), the
  capacity execution with factor 1.0 (``k = 0.5 * 196 = 98`` tokens per image: the same FLOPs as
  the threshold rule at 0.5) and with the capacity calibrated on the batch (quantile 1: exactly
  the threshold rule's outputs); graph breaks under ``torch.compile`` counted with
  ``torch._dynamo.explain``; at batch 1 the compiled capacity model (``fullgraph=True``).
* ``floor``: what the dense layers allow: the attention and MLP halves of the dense blocks timed
  at every token count the ToMe schedules (and DyT's capacity) produce, in the same rounds as the
  whole dense model; the speed-up a model would have if its token reduction cost nothing.
* ``--tome-reference DIR``: the official ToMe (facebookresearch/ToMe, a local copy holding its
  ``tome`` package; CC BY-NC 4.0, imported from where the user keeps it, never shipped) patched onto
  a copy of the deployed LoRA model (the same weights) at the same schedules, timed in the same
  rounds: rows "reference ToMe low/high", and "vs reference" rows with tokentune's speed over it.
* When ``floor`` runs with ``tome`` or ``dyt`` in one process, "vs floor" rows give each model's
  speed-up as a share of the floor measured in that process (issue goal: >= 0.97 in every run).
  With ``dyt`` the floor also times DyT's adapters on every token, and DyT is judged against the
  floor that includes them (its all-active baseline runs them too; only dispatching is free there).
* ``onnx``: the same models exported to ONNX (``tokentune.export_onnx``; DyT's threshold rule only
  exports in its mask form, its capacity execution as it is) and timed in ONNX Runtime (CPU
  provider, as many intra-op threads as torch uses), interleaved the same way.

Every run writes ``benchmarks/results/deploy_fast_path_<tag>.{md,json}``; ``--summarize`` reads
several runs and writes the medians with the goals (``deploy_fast_path_summary.md``).

    python benchmarks/deploy_fast_path.py --tag run1          # one run (about 25 minutes on 2 CPU cores)
    python benchmarks/deploy_fast_path.py --parts tome,dyt --rounds 3 --warmup 1 --no-compile --tag q1  # ~3 min
    python benchmarks/deploy_fast_path.py --parts floor --rounds 5 --warmup 1 --tag f1   # ~4 min
    python benchmarks/deploy_fast_path.py --summarize run1,run2,run3
    python benchmarks/deploy_fast_path.py --parts tome,dyt,floor --batch-sizes 1 --rounds 3 --warmup 1 \
        --no-compile --tome-reference ~/src/ToMe --tag b1a     # batch 1 against the floor and the reference
    python benchmarks/deploy_fast_path.py --summarize run1a+run1b,run2a+run2b   # runs made of two processes
    python benchmarks/deploy_fast_path.py --quick --tag quick  # tiny width, seconds (checks the script runs)
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Dict, List, Sequence

import torch
from torch import nn

from tokentune import create_model, deploy
from tokentune.core.flops import count_flops
from tokentune.methods import dyt
from tokentune.timing import measure_throughput, random_images
from tokentune.tools import measure

SCHEDULES = {"low": [16] * 11 + [10], "high": [40, 34, 30, 24, 18, 14, 10, 8, 4, 4, 3, 3]}
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# (part, batch, row, baseline row, goal on the median speed-up, what the goal says)
GOALS = [
    ("tome", 16, "ToMe low", "LoRA", 1.97, ">= 1.97x in every run"),
    ("tome", 16, "ToMe high", "LoRA", 3.35, ">= 3.35x in every run"),
    ("tome", 16, "PYRA low", "LoRA", 1.97, ">= 1.97x in every run"),
    ("tome", 16, "PYRA high", "LoRA", 3.35, ">= 3.35x in every run"),
    ("tome", 1, "ToMe low", "LoRA", 1.8, ">= 1.8x eager"),
    ("tome", 1, "ToMe high", "LoRA", 2.6, ">= 2.6x eager"),
    ("dyt", 16, "capacity 1.0", "all active", 1.40, ">= 1.40x"),
    ("dyt", 1, "capacity 1.0", "all active", 1.35, ">= 1.35x"),
    ("onnx", 16, "DyT capacity 1.0", "DyT mask form (dense)", 1.3, ">= 1.3x in onnxruntime"),
    ("vs floor", 1, "ToMe low", "floor", 0.97, ">= 0.97 of the floor in every run"),
    ("vs floor", 1, "ToMe high", "floor", 0.97, ">= 0.97 of the floor in every run"),
    ("vs floor", 1, "DyT capacity 1.0", "floor", 0.97, ">= 0.97 of the floor in every run"),
    ("vs reference", 1, "ToMe low", "reference ToMe low", 1.0, ">= 1.00 in every run"),
    ("vs reference", 1, "ToMe high", "reference ToMe high", 1.0, ">= 1.00 in every run"),
    ("onnx", 1, "DyT capacity 1.0", "DyT mask form (dense)", 1.3, ">= 1.3x in onnxruntime"),
]


class AllActive(nn.Module):
    """The same DyT model with every token active (its complete model)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.train(model.training)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images, dyt_complete=True)


class DropTokens(nn.Module):
    """Diagnostic merge plug-in: keeps the first N - r tokens (ToMe's counts, none of its work)."""

    def __init__(self, r: int) -> None:
        super().__init__()
        self.r = r

    def forward(self, x, keys, state):
        return x[:, : x.shape[1] - self.r].contiguous(), state


class OrtModel(nn.Module):
    """An ONNX Runtime session behind ``forward(images)`` so it can be timed like a model."""

    def __init__(self, path: str, threads: int) -> None:
        super().__init__()
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        self.session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        self.name = self.session.get_inputs()[0].name

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {self.name: images.numpy()})[0])


def _kw(args) -> dict:
    kw = dict(img_size=args.image_size)
    if args.quick:
        kw.update(embed_dim=64, depth=12, num_heads=2)
    return kw


def tome_models(args) -> Dict[str, nn.Module]:
    torch.manual_seed(0)
    lora = create_model(args.model, method="lora", num_classes=100, **_kw(args))
    models = {"LoRA": deploy(lora)}
    for name, sched in SCHEDULES.items():
        for method, label in (("lora+tome", "ToMe"), ("pyra", "PYRA")):
            torch.manual_seed(0)
            m = create_model(args.model, method=method, num_classes=100, tome_r=sched, **_kw(args))
            missing = m.load_state_dict(lora.state_dict(), strict=False).missing_keys
            assert all(".modulator." in k for k in missing), missing
            with torch.no_grad():             # PYRA's W_D starts at zero: give it the values training would
                for k, p in m.named_parameters():
                    if k.endswith("W_D"):
                        p.normal_(0, 0.02)
            models[f"{label} {name}"] = deploy(m)
    if args.tome_reference:
        models.update(reference_tome(args.tome_reference, models["LoRA"]))
    drop = copy.deepcopy(models["ToMe high"])
    for block, r in zip(drop.blocks, SCHEDULES["high"]):
        block.merge = DropTokens(r)
    drop.tokentune.prop_attn = False
    models["ToMe high, tokens dropped (no merge work)"] = drop
    return models


def reference_tome(path: str, dense: nn.Module) -> Dict[str, nn.Module]:
    """The official ToMe patched onto copies of the deployed LoRA model (the same weights), one per schedule."""
    if not os.path.isfile(os.path.join(path, "tome", "patch", "timm.py")):
        raise SystemExit(f"--tome-reference {path}: no tome/patch/timm.py there; point it at a checkout of "
                         "facebookresearch/ToMe")
    sys.path.insert(0, os.path.abspath(path))
    import tome  # noqa: E402  (the user's copy, found through the path above)

    models = {}
    for name, sched in SCHEDULES.items():
        ref = copy.deepcopy(dense)
        tome.patch.timm(ref)                      # proportional attention on, as for off-the-shelf evaluation
        ref.r = list(sched)
        models[f"reference ToMe {name}"] = ref.eval()
    return models


def share_rows(rows: List[dict], bs: int) -> List[dict]:
    """Each model's speed-up as a share of the floor of this process, and tokentune over the reference."""
    def speedup(part: str, model: str):
        return next((r["speedup"] for r in rows if (r["part"], r["batch"], r["model"]) == (part, bs, model)), None)

    out = []
    dyt_plan = "DyT MLP Dispatch 0.5 (capacity 1.0)"
    pairs = [("ToMe low", "tome", "ToMe low", "ToMe low: dense layers only (free reduction)"),
             ("ToMe high", "tome", "ToMe high", "ToMe high: dense layers only (free reduction)"),
             ("PYRA low", "tome", "PYRA low", "ToMe low: dense layers only (free reduction)"),
             ("PYRA high", "tome", "PYRA high", "ToMe high: dense layers only (free reduction)"),
             ("DyT capacity 1.0", "dyt", "capacity 1.0", f"{dyt_plan}: dense layers and adapters (free dispatch)"),
             ("DyT capacity 1.0 (floor without its adapters)", "dyt", "capacity 1.0",
              f"{dyt_plan}: dense layers only (free reduction)")]
    for label, part, model, plan in pairs:
        got, floor = speedup(part, model), speedup("floor", plan)
        if got is not None and floor is not None:
            out.append({"part": "vs floor", "batch": bs, "model": label, "speedup": got / floor, "baseline": "floor"})
    for name in SCHEDULES:
        ours, ref = speedup("tome", f"ToMe {name}"), speedup("tome", f"reference ToMe {name}")
        if ours is not None and ref is not None:
            out.append({"part": "vs reference", "batch": bs, "model": f"ToMe {name}", "speedup": ours / ref,
                        "baseline": f"reference ToMe {name}"})
    return out


def dyt_models(args, images: torch.Tensor) -> Dict[str, nn.Module]:
    torch.manual_seed(0)
    model = create_model(args.model, method="dyt", num_classes=100, **_kw(args))
    with torch.no_grad():                     # adapters do real work (their cost does not depend on the values)
        for k, p in model.named_parameters():
            if "adapter" in k and p.dim() > 1:
                p.normal_(0, 0.02)
    dyt.calibrate_activation(model, images, 0.5)
    threshold = deploy(model)
    exact = copy.deepcopy(model)
    dyt.calibrate_capacity(exact, images)
    return {"all active": AllActive(threshold), "threshold rule (skip)": threshold,
            "capacity 1.0": deploy(model, dyt_execution="capacity", dyt_capacity=1.0),
            "capacity calibrated (= threshold rule)": deploy(exact)}


class HalfBlock(nn.Module):
    """One half of every dense timm block, each on the first ``n`` tokens of the same input:
    attention (``x + ls1(attn(norm1(x)))``) or the MLP (``x + ls2(mlp(norm2(x)))``).

    Running the half of *every* block (not one block many times) streams all the weights from
    memory as the real model does; one block timed alone keeps its weights in the cache, which
    flatters small token counts."""

    def __init__(self, blocks, half: str, n: int) -> None:
        super().__init__()
        self.blocks, self.half, self.n = list(blocks), half, n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, out = x[:, : self.n], None
        for b in self.blocks:
            if self.half == "attn":
                out = x + b.drop_path1(b.ls1(b.attn(b.norm1(x))))
            else:
                out = x + b.drop_path2(b.ls2(b.mlp(b.norm2(x))))
        return out


class AdapterPart(nn.Module):
    """DyT's adapters of every block, each on the first ``n`` tokens of the same input
    (``x + adapter(x)``): work the DyT model does on every token in all its rows, so a floor for
    DyT's dispatching has to include it."""

    def __init__(self, adapters, n: int) -> None:
        super().__init__()
        self.adapters, self.n = list(adapters), n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, out = x[:, : self.n], None
        for adapter in self.adapters:
            out = x + adapter(x)
        return out


class OnImages(nn.Module):
    """A model that ignores its input and runs on fixed images, so it can be timed in the same
    interleaved rounds as the half-blocks (which take tokens)."""

    def __init__(self, model: nn.Module, images: torch.Tensor) -> None:
        super().__init__()
        self.model, self.images = model, images

    def forward(self, _: torch.Tensor) -> torch.Tensor:
        return self.model(self.images)


def token_counts(schedule: List[int], tokens: int) -> List[tuple]:
    """(tokens in attention, tokens in the MLP) of every block under a ToMe schedule: a block merges
    ``r`` tokens between its attention and its MLP."""
    counts = []
    for r in schedule:
        counts.append((tokens, tokens - r))
        tokens -= r
    return counts


def floor_rows(args, dense: nn.Module, images: torch.Tensor, rounds: int, warmup: int,
               adapters: Sequence[nn.Module] = ()) -> List[dict]:
    """What the dense layers allow: each half-block timed alone at every token count a schedule
    produces, and the speed-up a token-reduction model would have if its own work (matching,
    merging, proportional attention, dispatching) were free::

        bound = T_dense / (T_dense - sum_blocks t(197) + sum_blocks t(N_block))

    with ``t`` the measured time of the attention half at the block's input count plus the MLP half
    at its count after merging. On a CPU at batch 1 a block's time is ``a + b * N`` with a large
    fixed part ``a`` (reading the weights, per-operator overhead), so fewer tokens pay less than
    their FLOPs share; this bound is the eager speed-up that no cheaper merge step can beat.

    With DyT's ``adapters`` (one per block) the DyT plan gets a second row that adds their time on
    every token to both sides (DyT runs them on all tokens whatever it skips, in its all-active
    baseline too): the bound for free *dispatching*, the one DyT's "vs floor" row is judged by."""
    bs = images.shape[0]
    full = int(dense.patch_embed.num_patches + dense.num_prefix_tokens)
    plans = {f"ToMe {name}": token_counts(sched, full) for name, sched in SCHEDULES.items()}
    k = round(0.5 * dense.patch_embed.num_patches) + dense.num_prefix_tokens
    plans["DyT MLP Dispatch 0.5 (capacity 1.0)"] = [(full, k)] * len(dense.blocks)
    needed = {(h, n) for plan in plans.values() for a, m in plan for h, n in (("attn", a), ("mlp", m))}
    needed |= {("attn", full), ("mlp", full)}
    timed = {f"{h} {n}": HalfBlock(dense.blocks, h, n) for h, n in sorted(needed)}
    if adapters:
        timed[f"adapters {full}"] = AdapterPart(adapters, full)
    timed["dense"] = OnImages(dense, images)          # in the same rounds: a drift hits both alike
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(bs, full, dense.embed_dim, generator=g)
    stats = measure_throughput(timed, images=tokens, rounds=rounds, warmup=warmup)
    model_s = stats["dense"].seconds_per_batch

    def t(h: str, n: int) -> float:                   # one block's half, averaged over the blocks
        return stats[f"{h} {n}"].seconds_per_batch / len(dense.blocks)

    rows = []
    dense_blocks = len(dense.blocks) * (t("attn", full) + t("mlp", full))
    other = model_s - dense_blocks
    for h in ("attn", "mlp"):                      # least-squares t(N) = a + b N over the measured counts
        ns = sorted(n for hh, n in needed if hh == h)
        ts = [t(h, n) for n in ns]
        mn, mt = statistics.mean(ns), statistics.mean(ts)
        slope = sum((n - mn) * (y - mt) for n, y in zip(ns, ts)) / sum((n - mn) ** 2 for n in ns)
        fixed = mt - slope * mn
        rows.append({"part": "floor", "batch": bs, "model": f"dense {h} half, t(N) = a + b N",
                     "a_ms": fixed * 1e3, "b_us_per_token": slope * 1e6,
                     "fixed_share_at_197": fixed / t(h, full), "ms_at_197": t(h, full) * 1e3})
    for name, plan in plans.items():
        reduced = sum(t("attn", a) + t("mlp", m) for a, m in plan)
        flop_blocks = sum(a + m for a, m in plan) / (2 * full * len(plan))     # linear layers only
        rows.append({"part": "floor", "batch": bs, "model": f"{name}: dense layers only (free reduction)",
                     "speedup": model_s / (other + reduced), "baseline": "LoRA",
                     "linear_token_share": flop_blocks})
        if adapters and name.startswith("DyT"):
            side = stats[f"adapters {full}"].seconds_per_batch      # every block's adapter on every token
            rows.append({"part": "floor", "batch": bs, "model": f"{name}: dense layers and adapters (free dispatch)",
                         "speedup": (model_s + side) / (other + reduced + side), "baseline": "all active",
                         "linear_token_share": flop_blocks})
    return rows


def graph_breaks(model: nn.Module, images: torch.Tensor) -> int:
    torch._dynamo.reset()
    with torch.no_grad():
        return int(torch._dynamo.explain(model)(images).graph_break_count)


def time_rows(part: str, models: Dict[str, nn.Module], images: torch.Tensor, base: str, rounds: int,
              warmup: int, flops: Dict[str, float]) -> List[dict]:
    bs = images.shape[0]
    stats = measure_throughput(models, images=images, rounds=rounds, warmup=warmup,
                               iters_per_round=3 if bs == 1 else 1)
    rows = []
    for name, st in stats.items():
        rows.append({"part": part, "batch": bs, "model": name, "img_per_s": st.median, "img_per_s_low": st.low,
                     "img_per_s_high": st.high, "speedup": st.median / stats[base].median, "baseline": base,
                     "flops_ratio": (flops[base] / flops[name]) if name in flops else None})
    return rows


def export_all(args, tome: Dict[str, nn.Module], dyt_threshold: nn.Module, dyt_capacity: nn.Module) -> Dict[str, str]:
    """ONNX files of the models (cached: an export depends only on the models, which are seeded)."""
    from tokentune.tools.onnx import export_onnx

    cache = args.onnx_cache
    os.makedirs(cache, exist_ok=True)
    todo = {"LoRA": tome["LoRA"], "ToMe low": tome["ToMe low"], "ToMe high": tome["ToMe high"],
            "PYRA low": tome["PYRA low"], "PYRA high": tome["PYRA high"],
            "DyT mask form (dense)": dyt_threshold, "DyT capacity 1.0": dyt_capacity}
    paths = {}
    for name, model in todo.items():
        stem = "".join(c if c.isalnum() else "_" for c in name)
        path = os.path.join(cache, f"{'quick-' if args.quick else ''}{stem}.onnx")
        if not os.path.isfile(path):
            t0 = time.perf_counter()
            export_onnx(model, path, verify=True, dyt_mask_form=True, atol=1e-3)
            print(f"exported {name} in {time.perf_counter() - t0:.0f} s", flush=True)
        paths[name] = path
    return paths


def run(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    parts = args.parts.split(",")
    rounds = 2 if args.quick else args.rounds
    load_before = open("/proc/loadavg").read().split()[:3]
    rows: List[dict] = []
    checks: Dict[str, object] = {}
    tome = tome_models(args) if ("tome" in parts or "onnx" in parts or "floor" in parts) else {}
    dyt_sets = {}
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        images = random_images(bs, args.image_size, seed=0)
        if "tome" in parts:
            if args.tome_reference:           # the same weights and schedule: the outputs must agree
                with torch.no_grad():
                    checks[f"max |ToMe - reference ToMe| logit, batch {bs}"] = {
                        name: float((tome[f"ToMe {name}"](images) - tome[f"reference ToMe {name}"](images)).abs().max())
                        for name in SCHEDULES}
            flops = {n: count_flops(m, images) for n, m in tome.items()}
            timed = dict(tome)
            if bs == 1 and not args.no_compile:
                for name in ("LoRA", "ToMe low", "ToMe high"):
                    timed[f"{name} compiled"] = torch.compile(tome[name])
                    flops[f"{name} compiled"] = flops[name]
            rows += time_rows("tome", timed, images, "LoRA", rounds, args.warmup, flops)
        if "dyt" in parts or "onnx" in parts:
            dyt_sets[bs] = dyt_models(args, images)
        if "floor" in parts:
            adapters = [b.adapter for b in dyt_sets[bs]["threshold rule (skip)"].blocks] if bs in dyt_sets else []
            rows += floor_rows(args, tome["LoRA"], images, max(rounds, 5), args.warmup, adapters)
        if "dyt" in parts:
            models = dict(dyt_sets[bs])
            flops = {n: count_flops(m, images) for n, m in models.items()}
            if not any(k.startswith("graph breaks") for k in checks):   # they do not depend on the batch size
                checks[f"graph breaks, batch {bs}"] = {n: graph_breaks(models[n], images)
                                                       for n in ("threshold rule (skip)", "capacity 1.0")}
            if bs == 1 and not args.no_compile:
                models["capacity 1.0 compiled (fullgraph)"] = torch.compile(models["capacity 1.0"], fullgraph=True)
                flops["capacity 1.0 compiled (fullgraph)"] = flops["capacity 1.0"]
            rows += time_rows("dyt", models, images, "all active", rounds, args.warmup, flops)
        rows += share_rows(rows, bs)
    if "onnx" in parts:
        first = dyt_sets[max(dyt_sets)]
        paths = export_all(args, tome, first["threshold rule (skip)"], first["capacity 1.0"])
        sessions = {n: OrtModel(p, torch.get_num_threads()) for n, p in paths.items()}
        for bs in [int(b) for b in args.batch_sizes.split(",")]:
            images = random_images(bs, args.image_size, seed=0)
            for group, base in ((["LoRA", "ToMe low", "ToMe high", "PYRA low", "PYRA high"], "LoRA"),
                                (["DyT mask form (dense)", "DyT capacity 1.0"], "DyT mask form (dense)")):
                rows += time_rows("onnx", {n: sessions[n] for n in group}, images, base, rounds, args.warmup, {})
    env = measure.environment("cpu", "fp32")
    env["loadavg_before"] = " ".join(load_before)
    env["loadavg_after"] = " ".join(open("/proc/loadavg").read().split()[:3])
    title = (f"deploy fast path, {args.model} {args.image_size}px fp32, {torch.get_num_threads()} threads, "
             f"{rounds} interleaved rounds, run {args.tag}")
    prefix = os.path.join(args.out, f"deploy_fast_path_{args.tag}")
    cols = ["part", "batch", "model", "img_per_s", "img_per_s_low", "img_per_s_high", "speedup", "baseline",
            "flops_ratio"]
    if "floor" in parts:
        cols += ["linear_token_share", "a_ms", "b_us_per_token", "fixed_share_at_197", "ms_at_197"]
    md = measure.write_results(prefix, rows, env, cols, title)
    with open(prefix + ".json") as fh:
        data = json.load(fh)
    data["checks"] = checks
    with open(prefix + ".json", "w") as fh:
        json.dump(data, fh, indent=2, default=str)
    print(md)
    print(json.dumps(checks))


def summarize(args) -> None:
    runs = []
    for tags in args.summarize.split(","):            # "a+b": one run measured as several processes (parts)
        parts = []
        for tag in tags.split("+"):
            with open(os.path.join(args.out, f"deploy_fast_path_{tag}.json")) as fh:
                parts.append(json.load(fh))
        run = dict(parts[0], rows=[r for p in parts for r in p["rows"]],
                   checks={k: v for p in parts for k, v in p.get("checks", {}).items()})
        run["environment"] = dict(parts[0]["environment"], loadavg_after=parts[-1]["environment"]["loadavg_after"])
        run["title"] = f"run {tags}"
        runs.append(run)
    keys = []
    for row in runs[0]["rows"]:
        if row.get("speedup") is None:                  # the floor part's fit rows: in each run's own table
            continue
        keys.append((row["part"], row["batch"], row["model"]))
    lines = ["| part | batch | model | baseline | FLOPs ratio | speed-up, median of runs | per run | goal | met |",
             "|---|---|---|---|---|---|---|---|---|"]
    goals = {(p, b, m): (g, text) for p, b, m, _, g, text in GOALS}
    for key in keys:
        per = [next(r for r in run["rows"] if (r["part"], r["batch"], r["model"]) == key) for run in runs]
        speedups = [r["speedup"] for r in per]
        med = statistics.median(speedups)
        goal, text = goals.get(key, (None, ""))
        every = "every run" in text
        met = "" if goal is None else ("yes" if (min(speedups) if every else med) >= goal else "no")
        ratio = per[0].get("flops_ratio")
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {per[0].get('baseline', '')} | "
                     f"{'' if ratio is None else f'{ratio:.2f}x'} | {med:.2f}x | "
                     f"{', '.join(f'{s:.2f}x' for s in speedups)} | {text} | {met} |")
    env = runs[0]["environment"]
    loads = "; ".join(f"{r['title'].rsplit('run ', 1)[-1]}: {r['environment'].get('loadavg_before')} -> "
                      f"{r['environment'].get('loadavg_after')}" for r in runs)
    text = (f"## deploy fast path, median of {len(runs)} runs ({args.summarize})\n\n"
            f"Environment: {', '.join(f'{k}={v}' for k, v in env.items() if not k.startswith('loadavg'))}\n\n"
            f"Load average (1, 5, 15 min) before -> after each run: {loads}\n\n" + "\n".join(lines) + "\n\n"
            + "Graph breaks under torch.compile: "
            + json.dumps([r.get("checks", {}) for r in runs][0]) + "\n")
    path = os.path.join(args.out, "deploy_fast_path_summary.md")
    with open(path, "w") as fh:
        fh.write(text)
    print(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_base_patch16_224")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-sizes", default="16,1", help="comma-separated batch sizes")
    ap.add_argument("--parts", default="tome,dyt,onnx", help="comma-separated: tome, dyt, onnx, floor")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled rows")
    ap.add_argument("--quick", action="store_true", help="tiny width, few rounds: checks the script runs")
    ap.add_argument("--tag", default="run1", help="name of this run's result files")
    ap.add_argument("--summarize", default=None, metavar="TAG,TAG,...", help="write the medians of these runs")
    ap.add_argument("--onnx-cache", default=os.path.join(tempfile.gettempdir(), "tokentune-onnx-cache"),
                    help="where the ONNX files are written once and reused by later runs")
    ap.add_argument("--tome-reference", default=None, metavar="DIR",
                    help="a local checkout of facebookresearch/ToMe: time its timm patch beside ours (optional rows)")
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args()
    if args.summarize:
        summarize(args)
    else:
        run(args)


if __name__ == "__main__":
    main()

"""ToMe's merge step and PYRA's modulator at batch 1: the previous implementation against the current one.

At batch 1 a block's merge step (matching + size-weighted merge) costs the number of its operators
more than their arithmetic, so the step was rewritten with fewer of them (``tokentune.methods.tome.matching``).
This script keeps the previous step (``previous_matching``, ``previous_merge_weighted``: the code as
it was, same outputs up to float rounding) and PYRA's previous two-step modulation
(``previous_two_step``) and compares them side by side in one process, ViT-B/16 224 fp32 shapes:

* ``calls``: ATen operators one call launches (every operator, views included: each costs a
  dispatch), counted by ``torch.profiler``: deterministic, independent of the machine's load.
* ``step``: the merge step alone (r=16 of 197 tokens, the schedules' typical block) and the PYRA
  modulation alone, interleaved repetitions, median microseconds of CPU time of the calling
  thread (``time.thread_time``: robust to other processes on a shared machine) or wall time
  (``--clock wall``).
* ``pieces``: what else a reducing block does at batch 1, timed the same way as ``step``: SDPA
  with and without the proportional-attention bias ``[1, 1, 1, N]``, the bias itself, and one
  block of DyT's capacity execution (MLP Dispatch 0.5, as ``deploy_fast_path.py`` builds it): its
  dispatcher, its ``Linear(D -> 1)``, the top-k selection and the adapter every token runs.
* ``model``: the deployed ToMe low/high models with the previous and the current merge step
  inside (the same weights), the same model with tokens dropped instead of merged (ToMe's counts,
  no merge work: the floor the merge step can reach) and LoRA, interleaved rounds
  (``tokentune.measure_throughput``) at batch 1.

    python benchmarks/batch1_merge_step.py --threads 1 --tag b1        # about 3 minutes
    python benchmarks/batch1_merge_step.py --threads 2 --clock wall --parts model --rounds 6 --tag b1m
    python benchmarks/batch1_merge_step.py --quick --tag quick         # tiny width, seconds
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from typing import Dict, List

import torch
import torch.nn.functional as F
from deploy_fast_path import SCHEDULES, DropTokens  # the same schedules and tokens-dropped plug-in
from torch import nn
from torch.profiler import profile

from tokentune import create_model, deploy
from tokentune.core.flops import count_flops
from tokentune.core.skip import capacity_index
from tokentune.methods import dyt
from tokentune.methods.pyra.modulator import PYRAModulator
from tokentune.methods.tome import TokenMerging, bipartite_soft_matching, merge_weighted
from tokentune.methods.tome.matching import Matching, _layout
from tokentune.timing import measure_throughput, random_images
from tokentune.tools import measure

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# ----------------------------------------------------------------------------- the previous implementation
def previous_matching(metric: torch.Tensor, r: int, num_prefix: int) -> Matching:
    """The matching as it was before the batch-1 work (``argsort`` + ``sort``, ``max`` over all of A,
    four gathers, batch offsets added for every batch)."""
    B, N, _ = metric.shape
    pa, pb = (num_prefix + 1) // 2, num_prefix // 2
    prefix, a_rows, b_rows, out_base = _layout(B, N, num_prefix, r, metric.device)
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[:, 2 * pa::2], metric[:, 2 * pb + 1::2]
        node_max, node_idx = (a @ b.transpose(-1, -2)).max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)
        src = edge_idx[:, :r]
        unm = edge_idx[:, r:].sort(dim=-1)[0]
        dst = node_idx.gather(dim=-1, index=src)
        keep = torch.cat([prefix, a_rows.gather(1, unm), b_rows], dim=1)
    return Matching(keep=keep.flatten(), src=a_rows.gather(1, src).flatten(), dst=b_rows.gather(1, dst).flatten(),
                    dst_out=(dst + out_base).flatten(), batch=B, num_tokens=N, r=r)


def previous_merge_weighted(x, size, m: Matching, modulate=None):
    """The size-weighted merge as it was (``index_add_``, increment in three operators)."""
    B, N, C = x.shape
    rows = x.reshape(B * N, C)
    sizes = size.reshape(B * N, 1) if size is not None else x.new_ones(B * N, 1)
    d = m.dst_out
    src_size = sizes.index_select(0, m.src)
    out = rows.index_select(0, m.keep)
    out_size = sizes.index_select(0, m.keep).index_add_(0, d, src_size)
    dst = rows.index_select(0, m.dst)
    weighted = rows.index_select(0, m.src) * src_size
    if modulate is not None:
        weighted = modulate(weighted.view(B, m.r, C),
                            (dst * sizes.index_select(0, m.dst)).view(B, m.r, C)).reshape(B * m.r, C)
    out.index_add_(0, d, (weighted - dst * src_size) / out_size.index_select(0, d))
    return out.view(B, N - m.r, C), out_size.view(B, N - m.r, 1)


def previous_two_step(mod: PYRAModulator, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """PYRA's default modulation as it was: ``src + (src * 2 sigma(delta_D)) * (2 sigma(delta_r) - 1)``."""
    info = mod.norm(src + dst)
    delta_D = mod.W_r.transpose(0, 1) @ info
    delta_r = info @ mod.W_D.transpose(0, 1)
    return src + (src * (2 * torch.sigmoid(delta_D))) * (2 * torch.sigmoid(delta_r) - 1)


class PreviousMerging(TokenMerging):
    """A block's merge plug-in running the previous step (same module, same modulator)."""

    def match(self, keys, r, num_prefix):
        return previous_matching(keys, r, num_prefix)

    def combine(self, x, size, m):
        return previous_merge_weighted(x, size, m, self.modulator)


def with_merge(model: nn.Module, make) -> nn.Module:
    model = copy.deepcopy(model)
    for block in model.blocks:
        if isinstance(block.merge, TokenMerging):
            block.merge = make(block.merge)
    return model


# ----------------------------------------------------------------------------- parts
def _inputs(args, r: int = 16):
    g = torch.Generator().manual_seed(0)
    dim = 64 if args.quick else 768
    x, keys = torch.randn(1, 197, dim, generator=g), torch.randn(1, 197, 64, generator=g)
    size = torch.randint(1, 4, (1, 197, 1), generator=g).float()
    mod = PYRAModulator(r, dim)
    with torch.no_grad():
        mod.W_D.normal_(0, 0.02, generator=g)
    src, dst = torch.randn(1, r, dim, generator=g), torch.randn(1, r, dim, generator=g)
    return {
        "merge step": (lambda: previous_merge_weighted(x, size, previous_matching(keys, r, 1)),
                       lambda: merge_weighted(x, size, bipartite_soft_matching(keys, r, 1))),
        "PYRA modulation": (lambda: previous_two_step(mod, src, dst), lambda: mod(src, dst)),
    }


def count_calls(args) -> List[dict]:
    rows = []
    with torch.inference_mode():
        for what, (prev, cur) in _inputs(args).items():
            counts = {}
            for name, fn in (("previous", prev), ("current", cur)):
                for _ in range(3):
                    fn()
                with profile() as prof:
                    fn()
                counts[name] = sum(1 for e in prof.events() if e.name.startswith("aten::"))
                counts[name + "_top"] = sum(1 for e in prof.events() if e.name.startswith("aten::")
                                            and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))
            rows.append({"part": "calls", "what": what, "previous": counts["previous"], "current": counts["current"],
                         "previous_top": counts["previous_top"], "current_top": counts["current_top"]})
    return rows


def time_steps(args) -> List[dict]:
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    rows = []
    with torch.inference_mode():
        for what, (prev, cur) in _inputs(args).items():
            a, b = prev(), cur()
            a, b = (a[0], b[0]) if isinstance(a, tuple) else (a, b)
            diff = float((a - b).abs().max())
            assert diff < 1e-4, diff
            times: Dict[str, List[float]] = {"previous": [], "current": []}
            for i in range(args.step_rounds + 2):
                for name, fn in ((("previous", prev), ("current", cur)) if i % 2 else (("current", cur), ("previous", prev))):
                    t0 = clock()
                    for _ in range(args.step_reps):
                        fn()
                    if i >= 2:
                        times[name].append((clock() - t0) / args.step_reps)
            p, c = statistics.median(times["previous"]), statistics.median(times["current"])
            rows.append({"part": "step", "what": what, "previous_us": round(p * 1e6, 1), "current_us": round(c * 1e6, 1),
                         "saved_us": round((p - c) * 1e6, 1), "current/previous": round(c / p, 3), "max_abs_diff": f"{diff:.1e}"})
    return rows


def _interleaved(fns: Dict[str, object], args) -> Dict[str, float]:
    """Median microseconds per call of each function, interleaved rounds, the chosen clock."""
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    times: Dict[str, List[float]] = {k: [] for k in fns}
    reps = max(1, args.step_reps // 10)
    for i in range(args.step_rounds + 2):
        for name in (list(fns) if i % 2 else list(fns)[::-1]):
            t0 = clock()
            for _ in range(reps):
                fns[name]()
            if i >= 2:
                times[name].append((clock() - t0) / reps)
    return {k: statistics.median(v) * 1e6 for k, v in times.items()}


def time_pieces(args) -> List[dict]:
    dim, heads = (64, 2) if args.quick else (768, 12)
    g = torch.Generator().manual_seed(0)
    fns = {}
    for n in (197, 100):
        q, k, v = torch.randn(3, 1, heads, n, dim // heads, generator=g).unbind(0)
        size = torch.randint(1, 4, (1, n, 1), generator=g).float()
        bias = size.log().transpose(1, 2).unsqueeze(1)
        fns[f"SDPA, {n} tokens"] = lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v)
        fns[f"SDPA with the log-size bias, {n} tokens"] = (
            lambda q=q, k=k, v=v, bias=bias: F.scaled_dot_product_attention(q, k, v, attn_mask=bias))
        fns[f"log-size bias, {n} tokens"] = lambda size=size: size.log().transpose(1, 2).unsqueeze(1)
    torch.manual_seed(0)
    kw = dict(img_size=224, **(dict(embed_dim=64, depth=12, num_heads=2) if args.quick else {}))
    model = create_model("vit_base_patch16_224", method="dyt", num_classes=100, **kw)
    images = random_images(1, 224, seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adapter" in name and p.dim() > 1:
                p.normal_(0, 0.02)
    dyt.calibrate_activation(model, images, 0.5)
    capacity = deploy(model, dyt_execution="capacity", dyt_capacity=1.0)
    block = capacity.blocks[5]
    x = torch.randn(1, 197, model.embed_dim, generator=g)
    state = capacity.initial_state(x)
    logits = torch.randn(1, 196, generator=g)
    fns.update({"DyT capacity dispatcher (whole)": lambda: block.mlp_dispatcher(x, state),
                "DyT dispatcher's Linear(D -> 1)": lambda: block.mlp_dispatcher.linear(x),
                "DyT top-k selection (capacity_index, k = 98)": lambda: capacity_index(logits, 98, 1),
                "DyT adapter, 197 tokens": lambda: block.adapter(x)})
    with torch.inference_mode():
        us = _interleaved(fns, args)
    return [{"part": "pieces", "what": name, "current_us": round(t, 1)} for name, t in us.items()]


def time_models(args) -> List[dict]:
    kw = dict(img_size=224, **(dict(embed_dim=64, depth=12, num_heads=2) if args.quick else {}))
    torch.manual_seed(0)
    lora = create_model("vit_base_patch16_224", method="lora", num_classes=100, **kw)
    models: Dict[str, nn.Module] = {"LoRA": deploy(lora)}
    for name in args.schedules.split(","):
        torch.manual_seed(0)
        m = create_model("vit_base_patch16_224", method="lora+tome", num_classes=100, tome_r=SCHEDULES[name], **kw)
        m.load_state_dict(lora.state_dict(), strict=False)
        cur = deploy(m)
        models[f"ToMe {name}, previous step"] = with_merge(cur, lambda t: PreviousMerging(t.r, t.modulator))
        models[f"ToMe {name}, current step"] = cur
        drop = with_merge(cur, lambda t: DropTokens(t.r))
        drop.tokentune.prop_attn = False
        models[f"ToMe {name}, tokens dropped (no merge work)"] = drop
    images = random_images(1, 224, seed=0)
    flops = {n: count_flops(m, images) for n, m in models.items()}
    stats = measure_throughput(models, images=images, rounds=2 if args.quick else args.rounds, warmup=1,
                               iters_per_round=3)
    base = stats["LoRA"].median
    rows = []
    for name, st in stats.items():
        sched = name.split(",")[0]
        dropped = stats.get(f"{sched}, tokens dropped (no merge work)")
        rows.append({"part": "model", "what": name, "img_per_s": round(st.median, 3),
                     "speedup_vs_LoRA": round(st.median / base, 3), "flops_ratio": round(flops["LoRA"] / flops[name], 2),
                     "share_of_dropped": round(st.median / dropped.median, 3) if dropped is not None else None,
                     "ms_per_image": round(st.seconds_per_batch * 1e3, 2)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="calls,step,model")
    ap.add_argument("--schedules", default="low,high")
    ap.add_argument("--step-reps", type=int, default=100)
    ap.add_argument("--step-rounds", type=int, default=15)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                    help="step part: CPU time of this thread (robust to other processes) or wall time")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tag", default="run1")
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = " ".join(open("/proc/loadavg").read().split()[:3])
    rows: List[dict] = []
    if "calls" in args.parts:
        rows += count_calls(args)
    if "step" in args.parts:
        rows += time_steps(args)
    if "pieces" in args.parts:
        rows += time_pieces(args)
    if "model" in args.parts:
        rows += time_models(args)
    env = measure.environment("cpu", "fp32")
    env["loadavg_before"] = load_before
    env["loadavg_after"] = " ".join(open("/proc/loadavg").read().split()[:3])
    cols = ["part", "what", "previous", "current", "previous_top", "current_top", "previous_us", "current_us", "saved_us",
            "current/previous", "max_abs_diff", "img_per_s", "speedup_vs_LoRA", "flops_ratio", "share_of_dropped",
            "ms_per_image"]
    title = (f"batch-1 merge step, previous vs current, {torch.get_num_threads()} threads, clock {args.clock}, "
             f"run {args.tag}")
    print(measure.write_results(os.path.join(args.out, f"batch1_merge_step_{args.tag}"), rows, env, cols, title))


if __name__ == "__main__":
    main()

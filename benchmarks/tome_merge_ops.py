"""ToMe's per-block merge step: operator profile, and the current step against an alternative that was not kept.

Three parts, one process, ViT-B/16 224 fp32 shapes (random values: the cost does not depend on
them):

* ``profile``: ``torch.profiler`` of one deployed LoRA+ToMe block (attention, matching, merge, MLP)
  at each batch size: how many ATen operators that do work (leaf operators, views and
  allocations not counted) the merge step (matching + size-weighted merge) launches, and how its
  time compares to the whole block.
* ``step``: the merge step alone (``bipartite_soft_matching`` + ``merge_weighted``, r=16 of 197
  tokens) against ``alternative_step`` (only set B normalised, ``argmax``, one read of sources and
  destinations, ``index_put_`` accumulation), side by side, alternating order, median over
  repetitions.
* ``model``: deployed LoRA vs LoRA+ToMe and PYRA at the low and high schedules, each with the
  current merge and with the alternative step swapped in (``tokentune.measure_throughput``,
  interleaved rounds, same batch).

    python benchmarks/tome_merge_ops.py --tag run1
    python benchmarks/tome_merge_ops.py --quick --tag quick     # tiny width, seconds
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from typing import Dict, List

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from tokentune import create_model, deploy
from tokentune.methods.tome import TokenMerging, bipartite_soft_matching, merge_weighted
from tokentune.methods.tome.matching import _layout
from tokentune.timing import measure_throughput, random_images
from tokentune.tools import measure

SCHEDULES = {"low": [16] * 11 + [10], "high": [40, 34, 30, 24, 18, 14, 10, 8, 4, 4, 3, 3]}
# operators that only make views or allocate (not counted as work in the profile)
NO_WORK = {"as_strided", "view", "_unsafe_view", "slice", "select", "reshape", "expand", "transpose", "t", "unsqueeze",
           "unsqueeze_", "as_strided_", "squeeze", "unbind", "flatten", "alias", "detach", "lift_fresh", "empty",
           "empty_strided", "resize_", "permute", "narrow"}
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# ----------------------------------------------------------------------------- the alternative step
def alternative_step(x: torch.Tensor, keys: torch.Tensor, size, r: int, num_prefix: int, modulate=None):
    """The alternative merge step that was measured and not kept (same outputs up to float rounding):
    only set B normalised, argmax + gather instead of max, sources and destinations read in one
    ``index_select``, increments ``(x_i - x_d) s_i / s_d'`` accumulated with ``index_put_``."""
    B, N, C = x.shape
    pa, pb = (num_prefix + 1) // 2, num_prefix // 2
    prefix, a_rows, b_rows, out_base = _layout(B, N, num_prefix, r, x.device)
    with torch.no_grad():
        norm = keys.norm(dim=-1)
        a, b = keys[:, 2 * pa::2], keys[:, 2 * pb + 1::2] / norm[:, 2 * pb + 1::2, None]
        scores = a @ b.transpose(-1, -2)
        node_idx = scores.argmax(dim=-1)
        node_max = scores.gather(-1, node_idx[..., None])[..., 0] / norm[:, 2 * pa::2]
        edge_idx = node_max.argsort(dim=-1, descending=True)
        a_sorted = a_rows.gather(1, edge_idx)
        dst_i = node_idx.gather(1, edge_idx[:, :r])
        keep = torch.cat([prefix, a_sorted[:, r:].sort(dim=-1)[0], b_rows], dim=1).flatten()
        pairs = torch.stack([a_sorted[:, :r], b_rows.gather(1, dst_i)]).flatten()
        d = (dst_i + out_base).flatten()
    rows = x.reshape(B * N, C)
    sizes = size.reshape(B * N, 1) if size is not None else x.new_ones(B * N, 1)
    src_size = sizes.index_select(0, pairs[: B * r])
    out_size = sizes.index_select(0, keep).index_put_((d,), src_size, accumulate=True)
    dst_size = out_size.index_select(0, d)
    src, dst = rows.index_select(0, pairs).view(2, B * r, C).unbind(0)
    inc = (src - dst) * (src_size / dst_size)
    if modulate is not None:
        weighted = src * src_size
        modulated = modulate(weighted.view(B, r, C), (dst * sizes.index_select(0, pairs[B * r:])).view(B, r, C))
        inc = inc + (modulated.reshape(B * r, C) - weighted) / dst_size
    out = rows.index_select(0, keep).index_put_((d,), inc, accumulate=True)
    return out.view(B, N - r, C), out_size.view(B, N - r, 1)


class AlternativeMerging(TokenMerging):
    """A block's merge plug-in running :func:`alternative_step` (same module, same modulator)."""

    def forward(self, x, keys, state):
        x, size = alternative_step(x, keys, state.size, self.r, state.num_prefix, self.modulator)
        return x, state.replace(size=size)


def with_alternative_merge(model: nn.Module) -> nn.Module:
    model = copy.deepcopy(model)
    for block in model.blocks:
        if isinstance(block.merge, TokenMerging):
            block.merge = AlternativeMerging(block.merge.r, block.merge.modulator)
    return model


def current_step(x, keys, size, r, num_prefix):
    return merge_weighted(x, size, bipartite_soft_matching(keys, r, num_prefix))


# ----------------------------------------------------------------------------- parts
def _kw(args) -> dict:
    return dict(img_size=224, **(dict(embed_dim=64, depth=12, num_heads=2) if args.quick else {}))


def profile_block(args, batch: int) -> List[dict]:
    torch.manual_seed(0)
    model = deploy(create_model("vit_base_patch16_224", method="lora+tome", num_classes=100, tome_r=SCHEDULES["low"],
                                **_kw(args)))
    block, dim = model.blocks[0], model.embed_dim
    x = torch.randn(batch, 197, dim)
    state = model.initial_state(x)
    keys = torch.randn(batch, 197, dim // (2 if args.quick else 12))
    reps = 3 if args.quick else 20
    with torch.inference_mode():
        for _ in range(3):
            block(x, state)
            current_step(x, keys, None, 16, 1)
        rows = []
        for name, fn in (("whole block", lambda: block(x, state)), ("merge step", lambda: current_step(x, keys, None, 16, 1)),
                         ("merge step, alternative", lambda: alternative_step(x, keys, None, 16, 1))):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(reps):
                    fn()
            leaves = [e for e in prof.events() if e.name.startswith("aten::") and e.name[6:] not in NO_WORK
                      and not any(c.name.startswith("aten::") for c in e.cpu_children)]
            events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
            top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:4]
            rows.append({"part": "profile", "batch": batch, "what": name, "aten_ops": round(len(leaves) / reps),
                         "us_per_call": round(sum(e.self_cpu_time_total for e in events) / reps),
                         "top_self_time": ", ".join(f"{e.key[6:]} {e.self_cpu_time_total / reps:.0f}us" for e in top)})
    return rows


def time_step(args, batch: int) -> dict:
    g = torch.Generator().manual_seed(0)
    dim = 64 if args.quick else 768
    x, keys = torch.randn(batch, 197, dim, generator=g), torch.randn(batch, 197, 64, generator=g)
    size = torch.randint(1, 4, (batch, 197, 1), generator=g).float()
    fns = {"alternative": lambda: alternative_step(x, keys, size, 16, 1), "current": lambda: current_step(x, keys, size, 16, 1)}
    times: Dict[str, List[float]] = {k: [] for k in fns}
    with torch.inference_mode():
        got, want = fns["alternative"](), fns["current"]()
        diff = float((got[0] - want[0]).abs().max())
        assert torch.equal(got[1], want[1]) and diff < 1e-4, diff
        for i in range(args.step_reps + 3):
            for name in (list(fns) if i % 2 else list(fns)[::-1]):
                t0 = time.perf_counter()
                fns[name]()
                if i >= 3:
                    times[name].append(time.perf_counter() - t0)
    alt, cur = statistics.median(times["alternative"]), statistics.median(times["current"])
    return {"part": "step", "batch": batch, "what": "matching + weighted merge, r=16 of 197",
            "alternative_us": round(alt * 1e6, 1), "current_us": round(cur * 1e6, 1), "current/alternative": round(cur / alt, 2),
            "max_abs_diff": f"{diff:.1e}"}


def time_models(args, batch: int) -> List[dict]:
    torch.manual_seed(0)
    lora = create_model("vit_base_patch16_224", method="lora", num_classes=100, **_kw(args))
    models = {"LoRA": deploy(lora)}
    for name, sched in SCHEDULES.items():
        for method, label in (("lora+tome", "ToMe"), ("pyra", "PYRA")):
            torch.manual_seed(0)
            m = create_model("vit_base_patch16_224", method=method, num_classes=100, tome_r=sched, **_kw(args))
            m.load_state_dict(lora.state_dict(), strict=False)
            with torch.no_grad():
                for k, p in m.named_parameters():
                    if k.endswith("W_D"):
                        p.normal_(0, 0.02)
            models[f"{label} {name}"] = deploy(m)
            models[f"{label} {name}, alternative merge"] = with_alternative_merge(models[f"{label} {name}"])
    images = random_images(batch, 224, seed=0)
    stats = measure_throughput(models, images=images, rounds=2 if args.quick else args.rounds, warmup=1,
                               iters_per_round=3 if batch == 1 else 1)
    base = stats["LoRA"].median
    return [{"part": "model", "batch": batch, "what": name, "img_per_s": round(st.median, 2),
             "speedup_vs_LoRA": round(st.median / base, 3)} for name, st in stats.items()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", default="1,16")
    ap.add_argument("--parts", default="profile,step,model")
    ap.add_argument("--step-reps", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tag", default="run1")
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = " ".join(open("/proc/loadavg").read().split()[:3])
    rows: List[dict] = []
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        if "profile" in args.parts:
            rows += profile_block(args, batch)
        if "step" in args.parts:
            rows.append(time_step(args, batch))
        if "model" in args.parts:
            rows += time_models(args, batch)
    env = measure.environment("cpu", "fp32")
    env["loadavg_before"], env["loadavg_after"] = load_before, " ".join(open("/proc/loadavg").read().split()[:3])
    cols = ["part", "batch", "what", "aten_ops", "us_per_call", "top_self_time", "alternative_us", "current_us",
            "current/alternative", "max_abs_diff", "img_per_s", "speedup_vs_LoRA"]
    title = f"ToMe merge step, ViT-B/16 224 fp32, {torch.get_num_threads()} threads, run {args.tag}"
    print(measure.write_results(os.path.join(args.out, f"tome_merge_ops_{args.tag}"), rows, env, cols, title))


if __name__ == "__main__":
    main()

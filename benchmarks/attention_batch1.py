"""Attention's core at batch 1: fused SDPA with ToMe's log-size bias as a float mask vs the explicit form.

The official ToMe computes ``softmax(q k^T * scale + log s) v`` explicitly; tokentune calls
``F.scaled_dot_product_attention`` with the bias as ``attn_mask``. This times the two (and SDPA
without a mask) on one image, ViT-B's 12 heads of 64, at the token counts ToMe's schedules pass
through, interleaved in rounds of 200 calls each, medians in microseconds per call.

    python benchmarks/attention_batch1.py --threads 2
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict

import torch
import torch.nn.functional as F

from tokentune.timing import apply_allocator


def forms(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> Dict[str, Callable[[], torch.Tensor]]:
    """The three forms of ``softmax(q k^T / sqrt(d) + bias) v`` (the last without the bias)."""
    scale = q.shape[-1] ** -0.5
    return {"mask": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias),
            "plain": lambda: F.scaled_dot_product_attention(q, k, v),
            "explicit": lambda: (((q * scale) @ k.transpose(-2, -1)) + bias).softmax(-1) @ v}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", default="11,20,40,70,100,150,197")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print("allocator:", apply_allocator())          # the C allocator these timings run under
    torch.manual_seed(0)
    heads, dim = 12, 64
    print("| tokens | SDPA + mask (us) | SDPA, no mask (us) | explicit (us) | explicit / SDPA + mask |")
    print("|---|---|---|---|---|")
    with torch.inference_mode():
        for n in (int(t) for t in args.tokens.split(",")):
            fns = forms(*(torch.randn(1, heads, n, dim) for _ in range(3)), torch.randn(1, 1, 1, n).abs().log())
            torch.testing.assert_close(fns["mask"](), fns["explicit"](), rtol=1e-4, atol=1e-5)
            times = {name: [] for name in fns}
            for _ in range(args.rounds):
                for name, fn in fns.items():
                    fn()
                    t0 = time.perf_counter()
                    for _ in range(args.calls):
                        fn()
                    times[name].append((time.perf_counter() - t0) / args.calls * 1e6)
            med = {name: statistics.median(ts) for name, ts in times.items()}
            print(f"| {n} | {med['mask']:.1f} | {med['plain']:.1f} | {med['explicit']:.1f} | "
                  f"{med['explicit'] / med['mask']:.3f} |", flush=True)


if __name__ == "__main__":
    main()

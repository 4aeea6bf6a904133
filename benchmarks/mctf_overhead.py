"""Where deployed MCTF spends more than ToMe at the same FLOPs: ViT-B/16, 224 px, fp32, random weights,
LoRA merged. Interleaved forwards of ToMe and MCTF (and, with ``--against REV``, MCTF's reducer as it was at
git revision REV, on the same model) in one process; per forward the CPU time of this process
(``time.process_time``: with one thread, the forward's time less the waits for other jobs on a shared
machine; they still slow it through shared caches and memory) and the wall time; per block the CPU time
(minimum over the rounds) and that per GMAC of the block's analytic multiply-adds.

    python benchmarks/mctf_overhead.py --point low --threads 1 --rounds 5 --against 0efbec1
    python benchmarks/mctf_overhead.py --point high --threads 1 --rounds 5 --against 0efbec1
"""
from __future__ import annotations

import argparse
import copy
import importlib
import os
import subprocess
import sys
import tempfile
import time

import torch

import tokentune
from tokentune.methods.mctf import MCTFMerge, config_of
from tokentune.timing import apply_allocator

POINTS = {"low": "flops:2.001", "high": "flops:3.462:geometric"}   # ToMe low's and ToMe high's FLOPs ratios


def reducer_at(rev: str):
    """MCTF's reducer class as it was at git revision ``rev`` (its matching.py and method.py, imported as a
    package of their own, the method not registered again)."""
    root = tempfile.mkdtemp()
    pkg = os.path.join(root, "mctf_at_rev")
    os.makedirs(pkg)
    for name in ("matching.py", "method.py"):
        src = subprocess.check_output(["git", "show", f"{rev}:src/tokentune/methods/mctf/{name}"], text=True)
        src = src.replace("from ...", "from tokentune.").replace("from ..tome", "from tokentune.methods.tome")
        if name == "method.py":
            src = src[:src.index("register_method(Method(")]
        with open(os.path.join(pkg, name), "w", encoding="utf-8") as f:
            f.write(src)
    open(os.path.join(pkg, "__init__.py"), "w").close()
    sys.path.insert(0, root)
    return importlib.import_module("mctf_at_rev.method").MCTFMerge


def block_gmacs(n: int, m: int, mctf: bool, batch: int, dim: int = 768) -> float:
    """Multiply-adds of one ViT-B block (``n`` tokens in, ``m`` out): ToMe merges after attention, MCTF at
    the input (q/k and the map at n, the similarity of the A and B halves, values, map x values at n,
    projection and MLP at m), the counts of ``mctf_flops``."""
    c2 = dim * dim
    if not mctf:
        macs = 4 * n * c2 + 2 * n * n * dim + 8 * m * c2
    elif m == n:
        macs = 12 * n * c2 + 2 * n * n * dim
    else:
        macs = 2 * n * c2 + 2 * n * n * dim + (n // 2) * ((n - 1) // 2) * dim + 10 * m * c2
    return macs * batch / 1e9


def build(point: str, against) -> dict:
    models = {}
    for name in ("tome", "mctf"):
        torch.manual_seed(0)
        model = tokentune.create_model("vit_base_patch16_224", method=f"lora+{name}", num_classes=1000,
                                       pretrained=False, **{f"{name}_r": POINTS[point]}).eval()
        models[name] = tokentune.deploy(model)
    if against is not None:
        old = copy.deepcopy(models["mctf"])
        cfg = config_of(old)
        for module in old.modules():
            if isinstance(getattr(module, "reduce", None), MCTFMerge):
                module.reduce = against(module.reduce.r, cfg)
        models["mctf (before)"] = old
    return models


def time_blocks(models: dict, block_cpu: dict, tokens: dict) -> None:
    """Forward hooks: CPU time and input token count of every block."""
    for name, model in models.items():
        for i, block in enumerate(model.blocks):
            def pre(mod, args, name=name, i=i):
                tokens[name][i] = args[0].shape[1]
                block_cpu[name].setdefault(i, []).append(-time.process_time())

            def post(mod, args, out, name=name, i=i):
                block_cpu[name][i][-1] += time.process_time()
                tokens[name][i + 1] = out[0].shape[1]
            block.register_forward_pre_hook(pre)
            block.register_forward_hook(post)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--point", choices=sorted(POINTS), default="low")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--against", default=None, help="git revision whose MCTF reducer is timed beside")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("allocator:", apply_allocator())          # the C allocator these timings run under
    models = build(args.point, reducer_at(args.against) if args.against else None)
    block_cpu = {n: {} for n in models}
    tokens = {n: {} for n in models}
    time_blocks(models, block_cpu, tokens)
    x = torch.randn(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    cpu, wall = {n: [] for n in models}, {n: [] for n in models}
    load0 = os.getloadavg()
    names = list(models)
    with torch.inference_mode():
        for model in models.values():
            model(x)
        for r in range(args.rounds):
            for n in names[r % len(names):] + names[:r % len(names)]:
                c0, w0 = time.process_time(), time.perf_counter()
                models[n](x)
                cpu[n].append(time.process_time() - c0)
                wall[n].append(time.perf_counter() - w0)
    load1 = os.getloadavg()
    med = {n: sorted(v)[len(v) // 2] for n, v in cpu.items()}
    wmed = {n: sorted(v)[len(v) // 2] for n, v in wall.items()}
    print(f"ViT-B/16 {args.point} ({POINTS[args.point]}), batch {args.batch}, fp32, {args.threads} thread(s), "
          f"{args.rounds} interleaved rounds; load average {load0[0]:.1f} before, {load1[0]:.1f} after")
    print("| model | CPU s / forward (median) | CPU time / ToMe | wall time / ToMe |\n|---|---|---|---|")
    for n in names:
        print(f"| {n} | {med[n]:.3f} | {med[n] / med['tome']:.3f} | {wmed[n] / wmed['tome']:.3f} |")
    print("\nper block, CPU ms (min over rounds) and ms per GMAC of the block:")
    print("| block | ToMe tokens in->out | ToMe ms | ms/GMAC | " + " | ".join(
        f"{n} tokens | {n} ms | ms/GMAC" for n in names[1:]) + " |\n|" + "---|" * (4 + 3 * (len(names) - 1)))
    for i in range(len(models["tome"].blocks)):
        cells = []
        for n in names:
            a, b = tokens[n][i], tokens[n][i + 1]
            ms = min(block_cpu[n][i]) * 1e3
            cells += [f"{a}->{b}", f"{ms:.1f}", f"{ms / block_gmacs(a, b, n != 'tome', args.batch):.1f}"]
        print(f"| {i} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

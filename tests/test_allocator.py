"""The steady allocator: timings reuse activation memory instead of faulting it in each forward."""
import platform
import subprocess
import sys
import textwrap

import pytest

from tokentune import timing

CHILD = textwrap.dedent("""
    import ctypes, sys
    import torch
    from tokentune import timing

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                    "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    if sys.argv[1] == "steady":
        print(timing.steady_allocator())
    else:
        print(timing.allocator_state())
    before = libc.mallinfo2()
    x = torch.ones(12 * 2**20)               # 48 MiB: above glibc's largest dynamic mmap threshold
    during = libc.mallinfo2()
    del x
    y = torch.ones(12 * 2**20)
    print(during.hblkhd - before.hblkhd, during.uordblks - before.uordblks)
""")


def _glibc() -> bool:
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not _glibc(), reason="glibc's mallopt/mallinfo2")
@pytest.mark.parametrize("mode", ["system", "steady"])
def test_steady_allocator_keeps_large_activations_in_the_heap(mode):
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True).stdout.split("\n")
    state, (mmapped, heap) = out[0], map(int, out[1].split())
    if mode == "system":
        assert state == "system"
        assert mmapped >= 48 * 2**20 and heap < 2**20          # glibc maps it, and unmaps it on free
    else:
        assert state.startswith("steady (glibc")
        assert mmapped == 0 and heap >= 48 * 2**20             # held in the heap, reused next forward


def test_measure_throughput_applies_the_allocator_it_is_told(monkeypatch):
    import torch
    net = torch.nn.Linear(4, 2)
    with pytest.raises(ValueError, match="allocator must be 'steady' or 'system'"):
        timing.measure_throughput({"a": net}, images=torch.randn(2, 4), rounds=1, warmup=0, allocator="jemalloc")
    monkeypatch.setenv("TOKENTUNE_ALLOCATOR", "mine")
    with pytest.raises(ValueError, match="TOKENTUNE_ALLOCATOR"):
        timing.measure_throughput({"a": net}, images=torch.randn(2, 4), rounds=1, warmup=0)
    monkeypatch.setenv("TOKENTUNE_ALLOCATOR", "system")
    before = timing.allocator_state()
    timing.measure_throughput({"a": net}, images=torch.randn(2, 4), rounds=1, warmup=0)
    assert timing.allocator_state() == before                   # "system" changes nothing


def test_environment_records_the_allocator(monkeypatch):
    from tokentune.tools.measure import environment
    monkeypatch.setenv("TOKENTUNE_ALLOCATOR", "system")
    env = environment()
    assert env["allocator"] == timing.allocator_state()

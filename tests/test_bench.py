"""Measurement instruments: FLOPs (attention counted on CPU), memory, interleaved timing."""
import pytest
import torch
from conftest import tiny

import tokentune
from tokentune import timing
from tokentune.core import flops as flop_counter
from tokentune.tools import measure


def _vit_macs(tokens, dim, mlp_ratio, patches, patch, num_classes):
    """Multiply-adds of a ViT: patch embedding + blocks + head. ``tokens[i]`` enter block i's attention,
    ``tokens[i + 1]`` its MLP (merging sits between them)."""
    macs = patches * 3 * patch * patch * dim + dim * num_classes
    for n, m in zip(tokens[:-1], tokens[1:]):
        macs += n * dim * 3 * dim + 2 * n * n * dim + n * dim * dim + 2 * m * dim * int(dim * mlp_ratio)
    return macs


def test_flops_count_attention_on_cpu():
    model = tokentune.create_model("vit_tiny_patch16_224", method="lora", num_classes=5, **tiny()).eval()
    flops = flop_counter.count_flops(tokentune.deploy(model), torch.randn(1, 3, 32, 32))
    assert flops == 2 * _vit_macs([17] * 5, 48, 4.0, 16, 8, 5)


def test_flops_follow_the_merge_schedule():
    model = tokentune.create_model("vit_tiny_patch16_224", method="lora+tome", num_classes=5, tome_r=[4, 3, 2, 1],
                                   **tiny()).eval()
    flops = flop_counter.count_flops(tokentune.deploy(model), torch.randn(2, 3, 32, 32)) / 2
    # matching similarity a @ b^T is also a matmul, over the unprotected tokens (CLS sits in A):
    # [ceil(n/2) - 1, head_dim] x [head_dim, floor(n/2)] per image
    tokens = [17, 13, 10, 8, 7]
    match = sum(((n + 1) // 2 - 1) * (n // 2) * 16 for n in tokens[:-1])
    assert flops == 2 * (_vit_macs(tokens, 48, 4.0, 16, 8, 5) + match)


def test_peak_memory_and_timing_structure():
    model = tokentune.create_model("vit_tiny_patch16_224", method="lora", **tiny()).eval()
    mem = measure.peak_memory(lambda: model(torch.randn(4, 3, 32, 32)), "cpu")
    assert mem > 4 * 17 * 48 * 4          # at least one block's activations were alive at once
    stats = timing.measure_throughput({"a": model, "b": tokentune.deploy(model)}, batch_size=2, image_size=32,
                                     rounds=2, warmup=1)
    assert set(stats) == {"a", "b"} and all(s.median > 0 and s.low <= s.median <= s.high for s in stats.values())
    step = measure.measure_train_step(model, batch_size=2, image_size=32, steps=1, warmup=1)
    assert step["seconds_per_step"] > 0 and step["peak_memory_bytes"] > 0
    env = measure.environment()
    assert {"device", "threads", "dtype", "torch", "timm"} <= set(env)


def test_peak_memory_counts_new_tensors_not_views_of_parameters():
    # under no_grad, linear decomposes into t(weight) + addmm: the transposed weight is a view of a
    # parameter, not an allocation; only the input and output (4 KiB each) are new here
    layer = torch.nn.Linear(1024, 1024)
    with torch.no_grad():
        mem = measure.peak_memory(lambda: layer(torch.ones(1, 1024)), "cpu")
    assert mem == 2 * 1024 * 4
    model = tokentune.deploy(tokentune.create_model("vit_tiny_patch16_224", method="lora", **tiny()))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        no_grad = measure.peak_memory(lambda: model(x), "cpu")
    with torch.inference_mode():
        inference = measure.peak_memory(lambda: model(x), "cpu")
    assert no_grad == inference


def test_random_images_are_the_timed_batch():
    a = timing.random_images(3, 32, seed=5)
    assert a.shape == (3, 3, 32, 32) and torch.equal(a, timing.random_images(3, 32, seed=5))
    seen = []

    class Spy(torch.nn.Module):
        def forward(self, images):
            seen.append(images.clone())
            return images

    timing.measure_throughput({"m": Spy()}, batch_size=3, image_size=32, rounds=1, warmup=0, seed=5)
    assert torch.equal(seen[0], a)


def test_min_block_times_enough_forwards_of_a_fast_model():
    """A forward of ~10 ms with ``min_block_s=0.05``: each round times about 5 forwards, not one."""
    import time as _time

    calls = []

    class Slow(torch.nn.Module):
        def forward(self, images):
            calls.append(1)
            _time.sleep(0.01)
            return images

    stats = timing.measure_throughput({"m": Slow()}, batch_size=2, image_size=8, rounds=3, warmup=1, min_block_s=0.05)
    assert 1 + 3 * 3 <= len(calls) <= 1 + 3 * 5 and stats["m"].seconds_per_batch == pytest.approx(0.01, rel=0.5)
    calls.clear()
    timing.measure_throughput({"m": Slow()}, batch_size=2, image_size=8, rounds=3, warmup=1)
    assert len(calls) == 1 + 3


@pytest.fixture
def scripted(monkeypatch):
    """``scripted(durations)``: a model whose forwards take those seconds in turn, on a clock that moves only
    when they run (``timing``'s ``perf_counter`` replaced)."""
    clock = [0.0]
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])

    class Scripted(torch.nn.Module):
        def __init__(self, durations):
            super().__init__()
            self.durations = list(durations)

        def forward(self, images):
            clock[0] += self.durations.pop(0)
            return images

    return Scripted


def test_rounds_stop_early_once_they_agree(scripted):
    """``min_rounds``/``agree``: a scripted clock; rounds whose relative times agree within ``agree``
    stop after ``min_rounds``, disagreeing ones run all ``rounds``, and without ``min_rounds`` all run."""
    def run(base, cand, **kw):
        stats = timing.measure_throughput({"base": scripted(base), "cand": scripted(cand)}, batch_size=1, image_size=4,
                                          rounds=5, warmup=0, allocator="system", **kw)
        assert stats["base"].rounds == stats["cand"].rounds
        return stats["cand"].rounds

    steady = ([1.0, 1.1, 0.9, 1.0, 1.0], [0.5, 0.55, 0.45, 0.5, 0.5])       # the machine drifts, the ratio holds
    assert run(*steady, min_rounds=3, agree=0.05) == 3
    assert run(*steady) == 5
    noisy = ([1.0, 1.0, 1.0, 1.0, 1.0], [0.5, 0.6, 0.5, 0.5, 0.5])          # 20% apart in round 2
    assert run(*noisy, min_rounds=3, agree=0.05) == 5
    assert run(*noisy, min_rounds=3, agree=0.25) == 3
    with pytest.raises(ValueError, match="min_rounds"):
        run(*steady, min_rounds=0)


def test_paired_speedup_cancels_a_drift_of_the_machine(scripted):
    """``paired_speedup``: the median of each round's time ratio. The machine slows both models in rounds
    3-4 and the candidate alone in round 2: the paired speed-up is the true 2x, the ratio of the medians
    pairs the base's fast rounds with the candidate's slow ones."""
    stats = timing.measure_throughput({"base": scripted([1.0, 1.0, 1.0, 3.0, 3.0]),
                                       "cand": scripted([0.5, 0.5, 1.5, 1.5, 1.5])},
                                      batch_size=2, image_size=4, rounds=5, warmup=0, allocator="system")
    assert stats["cand"].round_seconds == (0.5, 0.5, 1.5, 1.5, 1.5)
    assert timing.paired_speedup(stats["cand"], stats["base"]) == pytest.approx(2.0)
    assert stats["cand"].median / stats["base"].median == pytest.approx(2 / 3)
    short = timing.TimingStats(1.0, 1.0, 1.0, 2, 2, 1.0, (1.0, 1.0))
    with pytest.raises(ValueError, match="equal rounds"):
        timing.paired_speedup(short, stats["base"])

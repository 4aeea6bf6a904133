"""benchmarks/gpu_suite.py runs (its --smoke mode, CPU, tiny model), so it is ready when a GPU is."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(tmp_path, *extra):
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src"), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_suite.py"), "--smoke", "--quiet",
                           "--out", str(tmp_path), *extra], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.load(open(tmp_path / "gpu_suite_smoke.json"))


def test_gpu_suite_smoke_times_every_row_against_the_plain_model(tmp_path):
    record = _run(tmp_path, "--no-compile")
    (table,) = record["eager"]
    labels = [row["label"] for row in table["rows"]]
    assert labels[:2] == ["LoRA (merged)", "ToMe low"] and "DyT r=0.5 (capacity)" in labels
    assert all(row.get("img_per_s", 0) > 0 for row in table["rows"]), table["rows"]
    assert (tmp_path / "gpu_suite_smoke.md").read_text().count("|") > 20


@pytest.mark.slow
def test_gpu_suite_smoke_compiled_rows(tmp_path):
    record = _run(tmp_path)
    (compiled,) = record["compiled"]
    assert compiled["rows"]["LoRA (merged)"]["speedup"] == 1.0 and len(compiled["rows"]) == 4

"""Per-run results and the VTAB-1k summary: group means, the two overall means, labels."""
import json
import os

import pytest

from tokentune.data import VTAB_TASKS
from tokentune.errors import TokenTuneError
from tokentune.evaluate import read_results, summarize, summary_markdown


def write_run(root, name, dataset, method, top1, best=None, model="vit_base_patch16_224.orig_in21k", label=None):
    path = os.path.join(root, name)
    os.makedirs(path, exist_ok=True)
    rec = {"dataset": dataset, "method": method, "model": model, "top1": top1,
           "best_top1_over_epochs": best if best is not None else top1}
    if label:
        rec["run"] = {"label": label}
    with open(os.path.join(path, "results.json"), "w") as fh:
        json.dump(rec, fh)
    return path


def test_vtab_summary_means(tmp_path):
    # every task: lora = 50 + index, tome = 40 (best 45); natural tasks of lora have a second seed
    for i, task in enumerate(VTAB_TASKS):
        write_run(tmp_path, f"lora-{task}", task, "lora", 50.0 + i)
        write_run(tmp_path, f"tome-{task}", task, "lora+tome", 40.0, best=45.0)
    for i, task in enumerate(list(VTAB_TASKS)[:7]):
        write_run(tmp_path, f"lora-{task}-seed1", task, "lora", 52.0 + i)
    s = summarize([str(tmp_path)])
    rows = {r["label"]: r for r in s["rows"]}
    lora = rows["lora"]
    assert s["tasks"] == list(VTAB_TASKS)
    assert lora["per_task"]["cifar"] == 51.0 and lora["runs_per_task"]["cifar"] == 2
    natural = sum(51.0 + i for i in range(7)) / 7
    specialized = sum(50.0 + i for i in range(7, 11)) / 4
    structured = sum(50.0 + i for i in range(11, 19)) / 8
    assert lora["groups"]["Natural"]["mean"] == pytest.approx(natural)
    assert lora["groups"]["Specialized"]["mean"] == pytest.approx(specialized)
    assert lora["groups"]["Structured"]["mean"] == pytest.approx(structured)
    assert lora["mean_of_groups"] == pytest.approx((natural + specialized + structured) / 3)
    assert lora["mean_of_tasks"] == pytest.approx((sum(51.0 + i for i in range(7)) + sum(50.0 + i for i in range(7, 19))) / 19)
    assert lora["num_tasks"] == 19
    assert rows["lora+tome"]["mean_of_tasks"] == 40.0
    assert summarize([str(tmp_path)], metric="best_top1_over_epochs")["rows"][1]["mean_of_tasks"] == 45.0
    md = summary_markdown(s)
    assert "| method | cifar | caltech101 |" in md and "Mean (3 groups) | Mean (tasks) |" in md
    assert "after the last epoch" in md and "mean of the Natural/Specialized/Structured means" in md
    assert "several runs (seeds)" in md
    assert "BEST top-1" in summary_markdown(summarize([str(tmp_path)], metric="best_top1_over_epochs"))


def test_partial_groups_labels_and_errors(tmp_path):
    write_run(tmp_path, "a", "cifar100", "lora", 70.0, model="m1")          # alias name in the record
    write_run(tmp_path, "b", "eurosat", "lora", 90.0, model="m2")
    write_run(tmp_path, "c", "my_images", "lora", 80.0, model="m1", label="mine")
    s = summarize([str(tmp_path)])
    labels = sorted(r["label"] for r in s["rows"])
    assert labels == ["m1 lora", "m2 lora", "mine"]                          # two models: model in the label
    assert s["tasks"] == ["cifar", "eurosat", "my_images"]
    row = next(r for r in s["rows"] if r["label"] == "m1 lora")
    assert row["groups"]["Natural"] == {"mean": 70.0, "tasks": 1, "of": 7}
    assert row["mean_of_groups"] is None                                     # not every group present
    assert "70.00*" in summary_markdown(s)
    assert {r["label"] for r in summarize([str(tmp_path)], label="method")["rows"]} == {"lora", "mine"}
    assert summarize([str(tmp_path / "a")])["rows"][0]["label"] == "lora"          # one model: the method alone
    os.makedirs(tmp_path / "empty")
    with pytest.raises(TokenTuneError, match="no results.json under"):
        summarize([str(tmp_path / "empty")])
    with pytest.raises(TokenTuneError, match="does not exist"):
        summarize([str(tmp_path / "missing")])
    with pytest.raises(TokenTuneError, match="has no results.json"):
        read_results(str(tmp_path / "empty"))
    with pytest.raises(TokenTuneError, match="unknown metric"):
        summarize([str(tmp_path)], metric="top5")

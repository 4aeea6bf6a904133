"""Per-run results and the VTAB-1k summary: group means, the two overall means, labels."""
import json
import os

import pytest

from tokentune.engine.data import VTAB_TASKS
from tokentune.engine.evaluate import read_results, summarize, summary_markdown, write_results
from tokentune.errors import TokenTuneError


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
    # sample std of the two seeds (50, 52): sqrt(((50-51)^2 + (52-51)^2) / 1)
    assert lora["per_task_std"]["cifar"] == pytest.approx(2 ** 0.5) and lora["per_task_std"]["eurosat"] is None
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
    assert "| lora | 51.00 (n=2) | 52.00 (n=2) |" in md and "(n=K) is the mean of K runs" in md
    assert "| lora+tome | 40.00 | 40.00 |" in md                            # one run each: no count
    assert "BEST top-1" in summary_markdown(summarize([str(tmp_path)], metric="best_top1_over_epochs"))


def test_partial_groups_labels_and_errors(tmp_path):
    write_run(tmp_path, "a", "cifar100", "lora", 70.0, model="m1")          # alias name in the record
    write_run(tmp_path, "b", "eurosat", "lora", 90.0, model="m2")
    write_run(tmp_path, "c", "my_images", "lora", 80.0, model="m1", label="mine")
    s = summarize([str(tmp_path)])
    labels = sorted(r["label"] for r in s["rows"])
    assert labels == ["m1 lora", "m2 lora"]                                  # two models: model in the label
    assert s["tasks"] == ["cifar", "eurosat"]
    assert s["other_datasets"] == ["my_images"] and [r["label"] for r in s["other_rows"]] == ["mine"]
    row = next(r for r in s["rows"] if r["label"] == "m1 lora")
    assert row["groups"]["Natural"] == {"mean": 70.0, "tasks": 1, "of": 7}
    assert row["mean_of_groups"] is None                                     # not every group present
    assert "70.00*" in summary_markdown(s)
    by_method = summarize([str(tmp_path)], label="method")
    assert [r["label"] for r in by_method["rows"]] == ["lora"] and by_method["other_rows"][0]["label"] == "mine"
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


def write_record(root, name, *, data, method="lora", top1):
    """A results.json as tokentune train writes it (run_results + write_results), reduced to what summarize reads."""
    path = os.path.join(root, name)
    os.makedirs(path)
    write_results(path, {"dataset": data.get("name"), "group": data.get("group"), "method": method,
                         "model": "vit_base_patch16_224.orig_in21k", "top1": top1, "best_top1_over_epochs": top1,
                         "data": dict(data, train={}, test={})})


def test_image_folder_runs_get_their_own_table_and_enter_no_vtab_mean(tmp_path):
    write_record(tmp_path, "eurosat", data={"name": "eurosat", "kind": "vtab", "group": "Specialized",
                                            "root": "/data/vtab-1k"}, top1=90.0)
    write_record(tmp_path, "cifar", data={"name": "cifar", "kind": "vtab", "group": "Natural",
                                          "root": "/data/vtab-1k"}, top1=70.0)
    write_record(tmp_path, "shapes", data={"name": "shapes", "kind": "folder", "group": None,
                                           "root": "/data/shapes"}, top1=40.0)
    # a folder that happens to be called cifar is not VTAB-1k's cifar split
    write_record(tmp_path, "my-cifar", data={"name": "cifar", "kind": "folder", "group": None,
                                             "root": "/photos/cifar"}, top1=10.0)
    # data without a name (a dataset object of the Python API): named by its folder, never "None"
    write_record(tmp_path, "nameless", data={"name": None, "kind": "list", "group": None, "root": "/photos/pets"},
                 top1=55.0)
    s = summarize([str(tmp_path)])
    assert s["tasks"] == ["cifar", "eurosat"] and [r["label"] for r in s["rows"]] == ["lora"]
    row = s["rows"][0]
    assert row["per_task"] == {"cifar": 70.0, "eurosat": 90.0} and row["mean_of_tasks"] == 80.0
    assert row["groups"]["Natural"]["mean"] == 70.0 and row["num_tasks"] == 2
    assert s["other_datasets"] == ["cifar", "pets", "shapes"]
    assert s["other_rows"] == [{"label": "lora", "per_dataset": {"cifar": 10.0, "pets": 55.0, "shapes": 40.0},
                                "per_dataset_std": {"cifar": None, "pets": None, "shapes": None},
                                "runs_per_dataset": {"cifar": 1, "pets": 1, "shapes": 1}}]
    md = summary_markdown(s)
    assert "None" not in md
    vtab_table, other_table = md.split("Other datasets (not VTAB-1k, in no mean above):")
    assert "| method | cifar | eurosat | Natural |" in vtab_table and "| lora | 70.00 | 90.00 | 70.00* |" in vtab_table
    assert "| method | cifar | pets | shapes |\n|---|---|---|---|\n| lora | 10.00 | 55.00 | 40.00 |" in other_table
    only_folders = summary_markdown(summarize([str(tmp_path / "shapes")]))
    assert only_folders.startswith("| method | shapes |") and "Mean (3 groups)" not in only_folders

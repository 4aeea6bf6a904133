"""tokentune sweep: the grid, its one-line errors, the local and submitit backends, restarts."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from safetensors.torch import load_file
from test_data import make_vtab

from tokentune import cli
from tokentune.tools.sweep import cells as C
from tokentune.tools.sweep import expand_cells, parse_sweep, read_sweep_file, run_sweep
from tokentune.tools.sweep.spec import TASK_GROUPS

TINY = {"model": "vit_tiny_patch16_224", "pretrained": "none",
        "timm": {"patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3}, "image_size": 32,
        "num_workers": 0, "batch_size": 4, "warmup_epochs": 0, "epochs": 1, "eval_batch_size": 8}
SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


@pytest.fixture(autouse=True)
def _child_env(monkeypatch):
    """The cells' tokentune processes import this checkout, one thread each."""
    monkeypatch.setenv("PYTHONPATH", SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def vtab_root(tmp_path, tasks=("eurosat", "dtd")):
    root = tmp_path / "vtab"
    for task in tasks:
        make_vtab(str(root), task, labels=(0, 1, 2, 1, 0, 2, 1, 0))
    return str(root)


def write_sweep(tmp_path, **values):
    spec = {"out": str(tmp_path / "sweep"), "data": vtab_root(tmp_path), "tasks": ["eurosat"],
            "methods": ["linear", "lora"], "seeds": [0, 1], "options": dict(TINY)}
    spec.update(values)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def cli_error(argv, capsys):
    code = cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


# ----------------------------------------------------------------------------- the grid
def test_cells_are_tasks_by_methods_by_grid_by_seeds(tmp_path):
    spec = parse_sweep({"out": str(tmp_path), "data": str(tmp_path), "tasks": ["natural", "eurosat", "cifar100"],
                        "methods": ["lora", "recipe:pyra-vtab", {"method": "adapter", "label": "AF"}],
                        "seeds": [0, 1, 2], "grid": {"lr": [1e-3, 1e-4]}, "options": {"epochs": 3}})
    cells = expand_cells(spec)
    assert len(cells) == (7 + 1) * 3 * 2 * 3            # cifar100 is natural's cifar: counted once
    assert len(TASK_GROUPS["all"]) == 19
    first = cells[0]
    assert first.task == "cifar" and first.label == "lora lr=0.001" and first.seed == 0
    assert first.options["dataset"] == "cifar" and first.options["data"] == str(tmp_path)
    assert first.options["epochs"] == 3 and first.options["lr"] == 1e-3 and first.options["method"] == "lora"
    assert first.run_dir == os.path.join(str(tmp_path), "cifar", "lora_lr=0.001", "seed0")
    recipe = [c for c in cells if c.options.get("recipe") == "pyra-vtab"][0]
    assert recipe.label.startswith("pyra-vtab") and "method" not in recipe.options
    assert len({c.run_dir for c in cells}) == len(cells)


@pytest.mark.parametrize("values, message", [
    ({"tasks": ["eurosat"], "methods": ["lora"], "colour": 1}, "unknown key(s) colour"),
    ({"tasks": ["imagenet"], "methods": ["lora"]}, "unknown task 'imagenet'"),
    ({"tasks": [], "methods": ["lora"]}, "'tasks' is missing or empty"),
    ({"tasks": ["eurosat"], "methods": ["lora"], "grid": {"lr": []}}, "'grid.lr' is empty"),
    ({"tasks": ["eurosat"], "methods": ["lora"], "seeds": [0, 0]}, "'seeds' must be distinct integers"),
    ({"tasks": ["eurosat"], "methods": ["lora"], "options": {"seed": 3}}, "sets seed, which the sweep decides"),
    ({"tasks": ["eurosat"], "methods": ["lora", "lora"]}, "the same label"),
    ({"tasks": ["eurosat"], "methods": ["recipe:nope"]}, "unknown recipe 'nope'"),
    ({"tasks": ["eurosat"], "methods": ["lora"], "slurm": {"gpus": 2}}, "unknown slurm option(s) gpus"),
    ({"tasks": ["eurosat"], "methods": ["lora"], "backend": "k8s"}, "backend 'k8s' is not one of"),
])
def test_a_malformed_sweep_file_fails_in_one_line(tmp_path, capsys, values, message):
    path = write_sweep(tmp_path, **values)
    code, err = cli_error(["sweep", path, "--dry-run"], capsys)
    assert code == 2 and len(err) == 1 and message in err[0] and path in err[0], err


@pytest.mark.parametrize("values, message", [
    ({"methods": ["lora+nope"]}, "unknown method 'nope'"),
    ({"grid": {"tome_r": [4]}}, "tome"),                     # an option no method of the cell takes
    ({"options": dict(TINY, lrr=1.0)}, "no option --lrr; did you mean lr"),
    ({"options": dict(TINY, epochs="many")}, "epochs"),
])
def test_an_option_the_train_command_refuses_names_the_cell(tmp_path, capsys, values, message):
    path = write_sweep(tmp_path, **values)
    code, err = cli_error(["sweep", path, "--dry-run"], capsys)
    assert code == 2 and len(err) == 1 and message in err[0] and "cell eurosat/" in err[0], err


def test_missing_data_of_one_task_is_named_before_anything_starts(tmp_path, capsys):
    path = write_sweep(tmp_path, tasks=["eurosat", "svhn"])
    code, err = cli_error(["sweep", path], capsys)
    assert code == 2 and len(err) == 1 and "task 'svhn'" in err[0] and "no folder for VTAB-1k task" in err[0]
    assert not os.path.exists(tmp_path / "sweep")


def test_dry_run_lists_the_cells_and_their_states(tmp_path, capsys):
    path = write_sweep(tmp_path)
    assert cli.main(["sweep", path, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "eurosat/lora/seed1" in out and "4 cells: 4 new" in out


# ----------------------------------------------------------------------------- locks and states
def test_a_lock_of_a_dead_process_is_taken_over_and_a_live_one_is_respected(tmp_path):
    spec = read_sweep_file(write_sweep(tmp_path))
    cell = expand_cells(spec)[0]
    sweep = C.SweepDir(spec.out)
    sweep.prepare()
    lock = sweep.path("locks", cell, ".json")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert C.acquire(lock, [dead.pid])
    assert sweep.state(cell) == C.NEW                   # its holder is gone: not running
    assert C.acquire(lock, [os.getpid()])               # taken over
    assert sweep.state(cell) == C.RUNNING
    assert not C.acquire(lock, [12345])                 # held by a live process
    C.release(lock)


# ----------------------------------------------------------------------------- end to end
def _weights(result):
    return {c.name: load_file(os.path.join(c.run_dir, "model.safetensors")) for c in result.cells}


def test_local_sweep_with_two_workers_ends_in_the_table_and_skips_finished_cells(tmp_path, capsys):
    path = write_sweep(tmp_path)
    assert cli.main(["sweep", path, "--workers", "2", "--no-progress", "--no-picture"]) == 0
    out = capsys.readouterr().out
    assert "4 cells: 4 done" in out
    table = open(tmp_path / "sweep" / "sweep.md").read()
    assert "| lora |" in table and "| linear |" in table and " ± " in table
    summary = json.load(open(tmp_path / "sweep" / "sweep.json"))
    row = {r["label"]: r for r in summary["rows"]}["lora"]
    assert row["runs_per_task"] == {"eurosat": 2}
    # the table's numbers are tokentune summarize's
    assert cli.main(["summarize", str(tmp_path / "sweep"), "--label", "method", "--json", str(tmp_path / "s.json")]) == 0
    plain = {r["label"]: r for r in json.load(open(tmp_path / "s.json"))["rows"]}
    assert plain["lora"]["mean_of_tasks"] == row["mean_of_tasks"]
    csv_text = open(tmp_path / "sweep" / "sweep.csv").read()
    assert csv_text.startswith("label,column,mean,std,runs") and "lora,eurosat," in csv_text
    # a second start finds every cell done and starts nothing
    before = {f: os.path.getmtime(os.path.join(dp, f)) for dp, _, fs in os.walk(tmp_path / "sweep" / "eurosat") for f in fs}
    started = time.time()
    assert cli.main(["sweep", path, "--no-progress", "--no-picture"]) == 0
    assert time.time() - started < 30
    after = {f: os.path.getmtime(os.path.join(dp, f)) for dp, _, fs in os.walk(tmp_path / "sweep" / "eurosat") for f in fs}
    assert before == after


def test_failed_cells_are_reported_then_retried_only_when_asked(tmp_path, capsys):
    path = write_sweep(tmp_path, methods=["lora"], seeds=[0], options=dict(TINY, lr=float("nan")))
    code = cli.main(["sweep", path, "--no-progress", "--no-picture"])
    out = capsys.readouterr().out
    assert code == 1 and "1 cells: 1 failed" in out and "failed: eurosat/lora/seed0: error:" in out
    spec = read_sweep_file(path)
    result = run_sweep(spec, progress=False, picture=False)          # skipped, still failed
    assert result.states == {"eurosat/lora/seed0": C.FAILED} and result.failed["eurosat/lora/seed0"].startswith("error:")


def test_an_interrupted_cell_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path):
    whole = run_sweep(read_sweep_file(write_sweep(tmp_path / "a", methods=["lora"], seeds=[0],
                                                  options=dict(TINY, epochs=2))), progress=False, picture=False)
    path = write_sweep(tmp_path / "b", methods=["lora"], seeds=[0], options=dict(TINY, epochs=2, max_steps=2))
    first = run_sweep(read_sweep_file(path), progress=False, picture=False)
    assert first.states == {"eurosat/lora/seed0": C.RESUME} and first.summary is None
    values = yaml.safe_load(open(path))
    values["options"].pop("max_steps")
    open(path, "w").write(yaml.safe_dump(values))
    second = run_sweep(read_sweep_file(path), progress=False, picture=False)
    assert second.states == {"eurosat/lora/seed0": C.DONE}
    a, b = _weights(whole)["eurosat/lora/seed0"], _weights(second)["eurosat/lora/seed0"]
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_submitit_local_executor_runs_the_slurm_code_path(tmp_path, capsys):
    path = write_sweep(tmp_path, backend="slurm", seeds=[0],
                       slurm={"time_min": 10, "gpus_per_task": 0, "cpus_per_task": 1, "array_parallelism": 2})
    assert cli.main(["sweep", path, "--slurm-cluster", "local", "--no-progress", "--no-picture"]) == 0
    assert "2 cells: 2 done" in capsys.readouterr().out
    assert os.path.isdir(tmp_path / "sweep" / ".sweep" / "submitit")


def test_the_slurm_backend_without_slurm_says_so_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))               # no srun, no sbatch
    path = write_sweep(tmp_path, backend="slurm")
    code, err = cli_error(["sweep", path, "--no-progress"], capsys)
    assert code == 2 and len(err) == 1 and "the slurm backend needs Slurm" in err[0], err


def test_a_slurm_option_submitit_rejects_fails_in_one_line(tmp_path, capsys, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("srun", "sbatch"):                          # a cluster's commands, so that submitit checks the options
        (bin_dir / tool).write_text("#!/bin/sh\nexit 1\n")
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir) + os.pathsep + os.environ["PATH"])
    path = write_sweep(tmp_path, backend="slurm", slurm={"time_min": "two hours"})
    code, err = cli_error(["sweep", path, "--no-progress"], capsys)
    assert code == 2 and len(err) == 1 and "submitit rejects the slurm options" in err[0] and "timeout_min" in err[0], err


# ----------------------------------------------------------------------------- the goal (slow)
@pytest.mark.slow
def test_full_vtab_grid_survives_kill_9_of_the_controller(tmp_path):
    """19 tasks x 3 methods x 3 seeds with --workers 2; the controller killed halfway, then restarted, ends
    with the same table and the same weights as an uninterrupted sweep."""
    tasks = TASK_GROUPS["all"]
    root = vtab_root(tmp_path, tasks)
    common = dict(data=root, tasks=["all"], methods=["linear", "lora", "adapter"], seeds=[0, 1, 2], workers=2)
    whole = write_sweep(tmp_path / "a", **common)
    env = dict(os.environ)
    subprocess.run([sys.executable, "-m", "tokentune", "sweep", whole, "--no-progress", "--no-picture"], env=env,
                   check=True, capture_output=True)
    cut = write_sweep(tmp_path / "b", **common)
    proc = subprocess.Popen([sys.executable, "-m", "tokentune", "sweep", cut, "--no-progress", "--no-picture"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done_dir = tmp_path / "b" / "sweep" / ".sweep" / "done"
    while not done_dir.is_dir() or len(os.listdir(done_dir)) < 19 * 3 * 3 // 2:
        time.sleep(0.5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    subprocess.run([sys.executable, "-m", "tokentune", "sweep", cut, "--no-progress", "--no-picture"], env=env,
                   check=True, capture_output=True)
    a = json.load(open(tmp_path / "a" / "sweep" / "sweep.json"))
    b = json.load(open(tmp_path / "b" / "sweep" / "sweep.json"))
    assert [r["per_task"] for r in a["rows"]] == [r["per_task"] for r in b["rows"]]
    for dirpath, _, files in os.walk(tmp_path / "a" / "sweep"):
        if "model.safetensors" in files and ".sweep" not in dirpath:
            other = dirpath.replace(str(tmp_path / "a"), str(tmp_path / "b"))
            x, y = load_file(os.path.join(dirpath, "model.safetensors")), load_file(os.path.join(other, "model.safetensors"))
            assert all((x[k] == y[k]).all() for k in x), dirpath

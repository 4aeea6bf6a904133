"""tokentune sweep: the grid, its one-line errors, the local and submitit backends, restarts."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_data import make_vtab

from tokentune import cli
from tokentune.engine.rundir import RunDir
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


def vtab_root(tmp_path, tasks=("eurosat", "dtd"), labels=(0, 1, 2, 1, 0, 2, 1, 0)):
    root = tmp_path / "vtab"
    for task in tasks:
        make_vtab(str(root), task, labels=labels)
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


def test_kill_9_of_the_controller_stops_its_cells_which_then_resume(tmp_path):
    """The kernel sends the running cell SIGTERM when its controller dies by kill -9: the run saves and
    stops (it does not run on unwatched), and the next start resumes it."""
    path = write_sweep(tmp_path, methods=["lora"], seeds=[0], options=dict(TINY, epochs=100000))
    spec = read_sweep_file(path)
    cell = expand_cells(spec)[0]
    sweep = C.SweepDir(spec.out)
    proc = subprocess.Popen([sys.executable, "-m", "tokentune", "sweep", path, "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not RunDir(cell.run_dir).is_run() and time.time() < deadline:    # the cell is training
            assert proc.poll() is None
            time.sleep(0.2)
        pids = json.load(open(sweep.path("locks", cell, ".json")))["pids"]
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert len(pids) == 2 and pids[0] == proc.pid
    deadline = time.time() + 60
    while C._pid_alive(pids[1]) and time.time() < deadline:
        time.sleep(0.1)
    assert not C._pid_alive(pids[1]), "the cell's process outlived its controller"
    assert sweep.state(cell) == C.RESUME and not os.path.exists(os.path.join(cell.run_dir, "results.json"))
    assert C.train_command("x.yaml", cell, resume=True)[-1] == "--resume"


def test_submitit_local_executor_runs_the_slurm_code_path(tmp_path, capsys):
    path = write_sweep(tmp_path, backend="slurm", seeds=[0],      # one at a time: the second job follows the first
                       slurm={"time_min": 10, "gpus_per_task": 0, "cpus_per_task": 1, "array_parallelism": 1})
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
def _cli(path, *flags, env):
    """``tokentune sweep PATH FLAGS`` in a process of its own; its output, checked for exit code 0."""
    done = subprocess.run([sys.executable, "-m", "tokentune", "sweep", path, "--no-progress", "--no-picture", *flags],
                          env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout


def _starts(spec):
    """{cell name: the 'start'/'resume' entries of its log}, one per process that ran the cell."""
    sweep = C.SweepDir(spec.out)
    return {c.name: [line.split()[-1] for line in open(sweep.path("logs", c, ".log")) if line.startswith("# ")]
            for c in expand_cells(spec)}


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _kill_halfway(path, env, total):
    """Start the sweep, ``kill -9`` it once half its cells are done; returns the pids of the cells it was running."""
    spec = read_sweep_file(path)
    err = open(os.path.join(os.path.dirname(path), "killed.err"), "w+")
    proc = subprocess.Popen([sys.executable, "-m", "tokentune", "sweep", path, "--no-progress", "--no-picture"], env=env,
                            stdout=subprocess.DEVNULL, stderr=err)
    done_dir = os.path.join(spec.out, ".sweep", "done")
    while not os.path.isdir(done_dir) or len(os.listdir(done_dir)) < total // 2:
        if proc.poll() is not None:
            err.seek(0)
            raise AssertionError(f"the sweep ended before half its cells were done: {err.read()[-2000:]}")
        time.sleep(0.2)
    err.close()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    locks, pids = os.path.join(spec.out, ".sweep", "locks"), []
    for name in os.listdir(locks):               # the killed controller's locks stay behind, naming its cells' pids
        try:
            pids += [p for p in json.load(open(os.path.join(locks, name))).get("pids", []) if p != proc.pid]
        except ValueError:                       # killed while writing it
            pass
    return pids


def _goal(tmp_path, tasks):
    """The issue's goal on ``tasks`` x 3 methods x 3 seeds: with --workers 2, the controller killed (-9) halfway
    and started again, ends with the same table and the same weights of every run as the uninterrupted sweep
    of submitit's local executor (the Slurm code path); no finished cell runs again, and only the cells that
    were running at the kill run a second time (resumed)."""
    total = len(tasks) * 3 * 3
    root = vtab_root(tmp_path, tasks, labels=(0, 1, 0, 1, 1, 0, 1, 0))      # patch_camelyon has 2 classes
    common = dict(data=root, tasks=list(tasks), methods=["linear", "lora", "adapter"], seeds=[0, 1, 2])
    env = dict(os.environ, MKL_NUM_THREADS="1")              # the same threads in every cell of both sweeps
    timings = {}

    # --workers 2, kill -9 of the controller halfway
    cut = write_sweep(tmp_path / "local", workers=2, **common)
    spec = read_sweep_file(cut)
    started = time.perf_counter()
    orphans = _kill_halfway(cut, env, total)
    deadline = time.time() + 60                # its running cells got SIGTERM from the kernel: they save and stop
    while any(_alive(p) for p in orphans) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(_alive(p) for p in orphans), "a cell's process outlived the killed controller"
    states = {n: s for n, s in run_sweep(spec, dry_run=True).states.items()}
    finished = sorted(n for n, s in states.items() if s == C.DONE)
    assert total // 2 <= len(finished) < total and C.RUNNING not in states.values() and C.FAILED not in states.values()
    cells = {c.name: c for c in expand_cells(spec)}
    stamps = {n: os.stat(os.path.join(cells[n].run_dir, "model.safetensors")).st_mtime_ns for n in finished}
    out = _cli(cut, env=env)
    timings["local --workers 2, killed halfway and restarted"] = time.perf_counter() - started
    assert f"{total} cells: {total} done" in out, out
    starts = _starts(spec)
    assert all(starts[n] == ["start"] for n in finished), "a cell that had finished ran again"
    again = {n: s for n, s in starts.items() if len(s) > 1}
    assert len(again) <= 2 and all(len(s) == 2 for s in again.values()), again     # at most the 2 running cells
    assert all(os.stat(os.path.join(cells[n].run_dir, "model.safetensors")).st_mtime_ns == stamps[n] for n in finished)

    # submitit's local executor, 2 cells at a time, uninterrupted
    whole = write_sweep(tmp_path / "submitit", backend="slurm", slurm={
        "time_min": 60, "gpus_per_task": 0, "cpus_per_task": 1, "array_parallelism": 2}, **common)
    started = time.perf_counter()
    out = _cli(whole, "--slurm-cluster", "local", env=env)
    timings["submitit local executor, 2 at a time"] = time.perf_counter() - started
    assert f"{total} cells: {total} done" in out, out
    assert os.path.isdir(tmp_path / "submitit" / "sweep" / ".sweep" / "submitit")
    assert all(s == ["start"] for s in _starts(read_sweep_file(whole)).values())

    # the same table, the same weights
    a, b = (tmp_path / "local" / "sweep", tmp_path / "submitit" / "sweep")
    assert (a / "sweep.md").read_text() == (b / "sweep.md").read_text()
    assert (a / "sweep.csv").read_text() == (b / "sweep.csv").read_text()
    rows = [json.load(open(d / "sweep.json"))["rows"] for d in (a, b)]
    assert rows[0] == rows[1] and len(rows[0]) == 3 and all(len(r["per_task"]) == len(tasks) for r in rows[0])
    assert all(r["runs_per_task"] == {t: 3 for t in tasks} for r in rows[0])
    for name, cell in cells.items():
        x = load_file(os.path.join(cell.run_dir, "model.safetensors"))
        y = load_file(os.path.join(str(b), name, "model.safetensors"))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name
    print("\n" + "\n".join(f"{k}: {v:.0f} s ({v / total:.2f} s/cell)" for k, v in timings.items()))


@pytest.mark.slow
def test_the_goal_on_three_tasks(tmp_path):
    """The goal test below on 3 tasks (27 cells, minutes): the same checks."""
    _goal(tmp_path, ["cifar", "eurosat", "patch_camelyon"])


@pytest.mark.slow
def test_full_vtab_grid_survives_kill_9_of_the_controller(tmp_path):
    """The issue's goal: 19 tasks x 3 methods x 3 seeds (171 cells, each a ``tokentune train`` process, under
    submitit inside a job process of its own)."""
    _goal(tmp_path, TASK_GROUPS["all"])

"""``tokentune search diffrate``: a trained run -> a rates file -> ``tokentune train --diffrate-rates``,
resumable, with ``--config``/``--print-config`` and one-line errors; on a tiny model and tiny data."""
import json
import re

import pytest
from test_cli import TINY_ARGS, help_text, run
from test_data import make_folder

from tokentune.engine.checkpoint import read_config

# a tiny model's FLOPs term is ~1e-6 GMACs^2: the weight and learning rate that move its rates in a few steps
SEARCH = ["--granularity", "1", "--lr", "1.0", "--min-lr", "0.1", "--flops-weight", "1e7", "--batch-size", "4",
          "--no-progress"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A LoRA run on a 3-class image folder (12 training images): the search's starting point."""
    import io
    from contextlib import redirect_stdout

    from tokentune import cli

    tmp = tmp_path_factory.mktemp("search")
    folder = make_folder(tmp / "shapes", classes=("a", "b", "c"), per_class=4)
    out = tmp / "lora"
    with redirect_stdout(io.StringIO()):
        code = cli.main(["train", "--image-folder", str(folder), "--method", "lora", "--epochs", "1", "--lr", "1e-3",
                         "--out", str(out)] + TINY_ARGS)
    assert code == 0
    return tmp, folder, out


def test_search_writes_rates_that_train_reads_and_resumes(lora_run, capsys, monkeypatch):
    tmp, folder, run_dir = lora_run
    rates = tmp / "rates.json"
    code, out, err = run(["search", "diffrate", str(run_dir), "--target-share", "0.7", "--epochs", "2", "--out",
                          str(rates)] + SEARCH, capsys)
    assert code == 0, err
    record = json.loads(rates.read_text())
    prune, merge = record["options"]["prune_kept"], record["options"]["merge_kept"]
    assert len(prune) == len(merge) == 4 and prune[0] == merge[0] == 17                  # the first block keeps all
    assert all(a >= b for a, b in zip(prune, merge)) and merge[-1] < 17                  # it does reduce
    assert record["target_gmacs"] == pytest.approx(0.7 * record["unreduced_gmacs"])
    assert abs(record["gmacs"] - record["target_gmacs"]) < 0.1 * record["unreduced_gmacs"]
    assert (record["num_tokens"], record["depth"], record["split"], len(record["history"])) == (17, 4, "train", 2)
    assert "--method lora+diffrate --diffrate-rates" in out and (tmp / "rates.json.search.pt").is_file()
    # resumable: one epoch, then the same command with two epochs continues to the uninterrupted result
    half = tmp / "half.json"
    code, _, err = run(["search", "diffrate", str(run_dir), "--target-share", "0.7", "--epochs", "1", "--out",
                        str(half)] + SEARCH, capsys)
    assert code == 0, err
    code, out, err = run(["search", "diffrate", str(run_dir), "--target-share", "0.7", "--epochs", "2", "--out",
                          str(half)] + SEARCH, capsys)
    assert code == 0 and "(continued)" in out, err
    resumed = json.loads(half.read_text())
    assert resumed["options"] == record["options"] and resumed["history"] == record["history"]
    # train reads the file (a relative path); the model records the counts, not the file, and evaluates deployed
    monkeypatch.chdir(tmp)
    code, out, err = run(["train", "--image-folder", str(folder), "--method", "lora+diffrate", "--diffrate-rates",
                          "rates.json", "--epochs", "1", "--lr", "1e-3", "--out", str(tmp / "diffrate")] + TINY_ARGS, capsys)
    assert code == 0, err
    recorded = read_config(str(tmp / "diffrate"))["configs"]["diffrate"]
    assert (recorded["prune_kept"], recorded["merge_kept"], recorded["rates"]) == (prune, merge, None)
    monkeypatch.chdir(folder)                   # extended from another directory: the file is found again
    code, out, err = run(["train", "--out", str(tmp / "diffrate"), "--resume", "--epochs", "2", "--no-progress"], capsys)
    assert code == 0 and "top-1 after the last epoch" in out, err
    code, out, err = run(["eval", str(tmp / "diffrate"), "--deploy", "--num-workers", "0", "--no-progress"], capsys)
    assert code == 0 and "[deployed]" in out, err


def test_config_file_and_print_config(lora_run, capsys):
    tmp, _, run_dir = lora_run
    config = tmp / "search.yaml"
    config.write_text(f"target_gmacs: 0.0009\nepochs: 5\nout: {tmp / 'from-config.json'}\n")
    code, out, err = run(["search", "diffrate", str(run_dir), "--config", str(config), "--epochs", "4", "--print-config"],
                         capsys)
    assert code == 0, err
    assert "target_gmacs: 0.0009" in out and "epochs: 4" in out and "granularity: 4" in out    # flags override the file
    assert "diffrate" in help_text("search")
    code, _, err = run(["search", "diffrate", str(run_dir), "--target-share", "0.5"], capsys)
    assert code == 2 and "name the file to write the found options to: --out FILE" in err, err


@pytest.mark.parametrize("args, match", [
    (["--target-gmacs", "1e-9"], r"a target of 1e-09 GMACs is out of reach: .*ask for a target in"),
    (["--target-gmacs", "1.0"], r"out of reach"),
    ([], r"give the FLOPs target as target_gmacs .* or target_share"),
    (["--target-share", "1.5"], r"invalid target_share=1.5"),
    (["--target-share", "0.5", "--image-folder", "/nonexistent/folder"], r"/nonexistent/folder"),
])
def test_search_errors_are_one_line(lora_run, capsys, args, match):
    tmp, _, run_dir = lora_run
    code, _, err = run(["search", "diffrate", str(run_dir), "--out", str(tmp / "bad.json")] + args + SEARCH, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert re.search(match, err), err


def test_train_refuses_a_missing_foreign_or_malformed_rates_file(lora_run, capsys):
    tmp, folder, run_dir = lora_run
    base = ["train", "--image-folder", str(folder), "--method", "lora+diffrate", "--epochs", "1",
            "--out", str(tmp / "never")]
    code, _, err = run(base + ["--diffrate-rates", str(tmp / "missing.json")] + TINY_ARGS, capsys)
    assert code == 2 and "does not exist; write it with 'tokentune search diffrate" in err, err
    for other in ({"method": "tome", "options": {}}, [17, 9, 9, 9]):
        (tmp / "other.json").write_text(json.dumps(other))
        code, _, err = run(base + ["--diffrate-rates", str(tmp / "other.json")] + TINY_ARGS, capsys)
        assert code == 2 and "is not a DiffRate rates file" in err, err
    (tmp / "other.json").write_text("{not json")
    code, _, err = run(base + ["--diffrate-rates", str(tmp / "other.json")] + TINY_ARGS, capsys)
    assert code == 2 and "is not readable JSON" in err and len(err.strip().splitlines()) == 1, err
    foreign = {"method": "diffrate", "options": {"prune_kept": [65, 40, 30, 20], "merge_kept": [65, 30, 20, 10]},
               "num_tokens": 65, "depth": 4}
    (tmp / "foreign.json").write_text(json.dumps(foreign))
    code, _, err = run(base + ["--diffrate-rates", str(tmp / "foreign.json")] + TINY_ARGS, capsys)
    assert code == 2 and "has rates for 4 blocks and 65 input tokens; this model has 4 blocks and 17" in err, err
    code, _, err = run(base + ["--diffrate-rates", str(tmp / "foreign.json"), "--diffrate-prune-kept", "17,9,9,9"]
                       + TINY_ARGS, capsys)
    assert code == 2 and "gives the counts; do not also pass" in err, err
    assert len(err.strip().splitlines()) == 1

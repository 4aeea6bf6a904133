"""Hugging Face hub, offline: a local folder in the hub cache stands in for the repository. Uploads go
through push_to_hub's real code up to huggingface_hub's HfApi.create_commit, which writes the
commit into that cache; loads go through huggingface_hub's real snapshot_download (offline)."""
import hashlib
import json

import pytest
import timm
import torch
from conftest import randomize_lora, tiny

import tokentune
from tokentune.errors import TokenTuneError

hub = pytest.importorskip("huggingface_hub")
NAME = "vit_tiny_patch16_224"
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """HfApi.create_repo/create_commit write into a local hub cache that snapshot_download reads offline."""
    cache = tmp_path / "hub-cache"
    monkeypatch.setattr(hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", True)
    commits = []

    def create_repo(self, repo_id, **kwargs):
        return f"https://huggingface.co/{repo_id}"

    def create_commit(self, repo_id, operations, commit_message=None, revision=None, create_pr=None, **kwargs):
        files = {}
        for op in operations:
            src = op.path_or_fileobj
            files[op.path_in_repo] = src if isinstance(src, bytes) else open(src, "rb").read()
        sha = hashlib.sha1(json.dumps(sorted(files)).encode() + b"".join(files.values())).hexdigest()
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        (repo / "snapshots" / sha).mkdir(parents=True)
        for name, data in files.items():
            (repo / "snapshots" / sha / name).write_bytes(data)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / (revision or "main")).write_text(sha)
        commits.append((repo_id, sorted(files), commit_message))
        return hub.CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/{sha}", commit_message=commit_message,
                              commit_description="", oid=sha)

    monkeypatch.setattr(hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(hub.HfApi, "create_commit", create_commit)
    return commits


def _trained(method="lora", **options):
    model = tokentune.create_model(NAME, method=method, num_classes=5, seed=1, **options, **tiny()).eval()
    randomize_lora(model)
    return model


def test_run_round_trip_through_the_hub(tmp_path, fake_hub):
    model = _trained()
    tokentune.save_trained(model, tmp_path / "run")
    (tmp_path / "run" / "resume.pt").write_bytes(b"not uploaded")
    url = tokentune.push_to_hub(tmp_path / "run", "me/run")
    assert url.startswith("https://huggingface.co/me/run/commit/")
    repo, files, message = fake_hub[-1]
    assert files == ["README.md", "config.json", "model.safetensors"] and "lora model" in message
    with torch.no_grad():
        assert (tokentune.load_trained("hf-hub:me/run").eval()(X) - model(X)).abs().max() < 1e-6
        assert (tokentune.open_model("hf-hub:me/run")(X) - model(X)).abs().max() < 1e-6
    tokentune.push_to_hub(model, "me/model")          # a model: its trained tensors, as a run
    with torch.no_grad():
        assert (tokentune.load_trained("hf-hub:me/model").eval()(X) - model(X)).abs().max() < 1e-6


def test_plain_export_on_the_hub_loads_in_timm(tmp_path, fake_hub):
    model = _trained()
    tokentune.export_deployed(model, tmp_path / "out")
    tokentune.push_to_hub(tmp_path / "out", "hf-hub:me/exported")
    timm_model = timm.create_model("hf-hub:me/exported", pretrained=True).eval()
    with torch.no_grad():
        assert (timm_model(X) - model(X)).abs().max() < 1e-5
        assert (tokentune.load_deployed("hf-hub:me/exported")(X) - model(X)).abs().max() < 1e-5
    assert timm.data.resolve_model_data_config(timm_model)["crop_pct"] == 1.0
    # the same export as a backbone: hf-hub: names build tokentune models
    again = tokentune.create_model("hf-hub:me/exported", method="lora+tome", tome_r=0, pretrained=True).eval()
    with torch.no_grad():
        assert (again(X) - model(X)).abs().max() < 1e-5
    assert again.tokentune.spec["model"] == "hf-hub:me/exported"


def test_tome_export_on_the_hub_is_refused_by_timm(tmp_path, fake_hub):
    model = _trained("lora+tome", tome_r=2)
    tokentune.export_deployed(model, tmp_path / "out")
    tokentune.push_to_hub(tmp_path / "out", "me/tome")
    with pytest.raises(RuntimeError, match="tokentune-deployed lora\\+tome"):
        timm.create_model("hf-hub:me/tome", pretrained=True)
    with torch.no_grad():
        assert (tokentune.load_deployed("hf-hub:me/tome")(X) - model(X)).abs().max() < 1e-5


def test_peft_adapter_through_the_hub(tmp_path, fake_hub):
    model = _trained(lora_targets=("qkv", "fc2"))
    tokentune.save_peft(model, tmp_path / "adapter")
    tokentune.push_to_hub(tmp_path / "adapter", "me/adapter")
    assert fake_hub[-1][1] == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    with torch.no_grad():
        assert (tokentune.load_peft("hf-hub:me/adapter", pretrained=False)(X) - model(X)).abs().max() < 1e-6


def test_missing_repository_offline_is_one_line(fake_hub):
    with pytest.raises(TokenTuneError, match="hf-hub:me/nothing is not in the local Hugging Face cache") as info:
        tokentune.load_trained("hf-hub:me/nothing")
    assert "\n" not in str(info.value)
    with pytest.raises(TokenTuneError, match="not in the local Hugging Face cache"):
        tokentune.create_model("hf-hub:me/nothing", method="lora")
    with pytest.raises(TokenTuneError, match="neither a run directory"):
        tokentune.push_to_hub(".", "me/x")

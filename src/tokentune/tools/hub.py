"""Publishing to the Hugging Face hub: runs, deployed exports and peft adapters.

:func:`push_to_hub` uploads what a folder needs to be loaded again, never more (no ``resume.pt``):

* a run directory: ``config.json`` + ``model.safetensors`` (+ ``metrics.json``, ``results.json``),
  loaded with ``tokentune.load_trained("hf-hub:owner/repo")``;
* an export directory: ``deployed.safetensors`` + ``deployed.json`` + timm's ``config.json``,
  loaded with ``tokentune.load_deployed("hf-hub:owner/repo")``; the weights of a plain timm export
  are uploaded as ``model.safetensors``, the name timm's hub loader reads, so
  ``timm.create_model("hf-hub:owner/repo", pretrained=True)`` loads it too;
* a peft adapter directory (:func:`tokentune.save_peft`): loaded with ``tokentune.load_peft`` and
  ``peft.PeftModel.from_pretrained``;
* a model (built by :func:`tokentune.create_model`): its trained tensors, as a run directory.

A short model card (``README.md``) saying how to load it is added unless the folder has one. The
upload is one commit (``huggingface_hub.HfApi.create_commit``); ``huggingface_hub`` comes with
timm (the ``hub`` extra pins it).
"""
from __future__ import annotations

import os
import re
import tempfile
from typing import List, Optional, Tuple, Union

from torch import nn

from ..core.hub import ADAPTER_CONFIG, ADAPTER_WEIGHTS, split_revision
from ..engine.checkpoint import save_trained
from ..engine.rundir import CONFIG_NAME, METRICS_NAME, RESULTS_NAME, WEIGHTS_NAME, RunDir
from ..errors import TokenTuneError
from ..utils import one_line, require_extra
from .export import DEPLOYED_CONFIG, DEPLOYED_WEIGHTS, HUB_WEIGHTS, TIMM_CONFIG, is_export, read_deployed_config

PathLike = Union[str, "os.PathLike[str]"]


def _contents(directory: str) -> Tuple[str, List[Union[str, Tuple[str, str]]], str]:
    """``(kind, files to upload (or (local name, name in the repository)), how to load it)`` of a folder."""
    if is_export(directory):
        config = read_deployed_config(directory)
        spec = config["spec"]
        how = "tokentune.load_deployed(\"hf-hub:{repo}\")"
        files = [DEPLOYED_CONFIG, TIMM_CONFIG, DEPLOYED_WEIGHTS]
        if config.get("plain_timm"):     # under the name timm's hub loader reads
            how += " or timm.create_model(\"hf-hub:{repo}\", pretrained=True)"
            files[-1] = (DEPLOYED_WEIGHTS, HUB_WEIGHTS)
        return f"deployed {spec['method']} export of {spec['model']}", files, how
    run = RunDir(directory)
    if os.path.isfile(run.weights) and os.path.isfile(run.config):
        config = run.read_config()
        files = [CONFIG_NAME, WEIGHTS_NAME] + [n for n in (METRICS_NAME, RESULTS_NAME) if os.path.isfile(run.file(n))]
        return (f"{config['method']} model of {config['model']} (trained tensors only)", files,
                "tokentune.load_trained(\"hf-hub:{repo}\")")
    if os.path.isfile(os.path.join(directory, ADAPTER_CONFIG)):
        return ("peft LoRA adapter of a timm ViT", [ADAPTER_CONFIG, ADAPTER_WEIGHTS],
                "tokentune.load_peft(\"hf-hub:{repo}\") or peft.PeftModel.from_pretrained(timm_model, \"{repo}\")")
    raise TokenTuneError(f"{directory!r} is neither a run directory, an export nor a peft adapter; pass a folder written "
                         "by tokentune train/save_trained, export_deployed or save_peft")


def model_card(kind: str, how: str, repo: str) -> str:
    """A minimal ``README.md`` for the hub: what the repository holds and how to load it."""
    return ("---\nlibrary_name: tokentune\ntags:\n- tokentune\n- timm\n- image-classification\n---\n\n"
            f"# {repo}\n\nA {kind}, written by tokentune.\n\nLoad it with `{how.format(repo=repo)}`.\n")


_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def hub_repo_id(repo_id: str) -> Tuple[str, Optional[str]]:
    """``(owner/name, revision)`` of a hub repository given as ``[hf-hub:]owner/name[@revision]``; anything
    else (a ``local-dir:`` folder, a path) is one line saying what push_to_hub takes."""
    text = str(repo_id)
    if text.startswith(("local-dir:", ".", "/", "~")):
        raise TokenTuneError(f"push_to_hub uploads to a Hugging Face hub repository (owner/name), not to the folder "
                             f"{text!r}; a run, export or adapter folder is already what load_trained/load_deployed/"
                             "load_peft read as local-dir:FOLDER (copy the folder there)")
    repo, revision = split_revision(text[len("hf-hub:"):] if text.startswith("hf-hub:") else text)
    if not _REPO_ID.match(repo):
        raise TokenTuneError(f"{text!r} is not a hub repository id; write owner/name (optionally hf-hub:owner/name@branch)")
    return repo, revision


def push_to_hub(source: Union[nn.Module, PathLike], repo_id: str, *, private: Optional[bool] = None,
                token: Optional[str] = None, commit_message: Optional[str] = None,
                create_pr: bool = False) -> str:
    """Upload a run, an export, a peft adapter or a model's trained tensors to the hub repository ``repo_id``.

    Args:
        source: a folder (run directory, export directory, peft adapter) or a model built by
            :func:`tokentune.create_model` (uploaded as :func:`tokentune.save_trained` writes it).
        repo_id: ``owner/name`` (``hf-hub:`` and ``@revision`` accepted: the revision is the branch).
        private: create the repository as private (when it does not exist yet).
        token: hub token (default: the one ``huggingface-cli login`` stored).
        commit_message: default: "Upload <what> with tokentune".
        create_pr: open a pull request instead of committing to the branch.

    Returns:
        The URL of the commit (or pull request).
    """
    repo, revision = hub_repo_id(repo_id)
    hub = require_extra("huggingface_hub", "hub", "pushing to the Hugging Face hub")
    with tempfile.TemporaryDirectory() as tmp:
        if isinstance(source, nn.Module):
            save_trained(source, tmp)
            directory = tmp
        else:
            directory = os.path.expanduser(os.fspath(source))
            if not os.path.isdir(directory):
                raise TokenTuneError(f"{directory!r} is not a directory; pass a run, export or peft adapter folder")
        kind, files, how = _contents(directory)
        pairs = [f if isinstance(f, tuple) else (f, f) for f in files]     # (local name, name in the repository)
        missing = [f for f, _ in pairs if not os.path.isfile(os.path.join(directory, f))]
        if missing:
            raise TokenTuneError(f"{directory!r} lacks {missing[0]}; write the folder again before pushing it")
        operations = [hub.CommitOperationAdd(path_in_repo=name, path_or_fileobj=os.path.join(directory, f))
                      for f, name in pairs]
        if not os.path.isfile(os.path.join(directory, "README.md")):
            operations.append(hub.CommitOperationAdd(path_in_repo="README.md",
                                                     path_or_fileobj=model_card(kind, how, repo).encode()))
        api = hub.HfApi(token=token)
        try:
            api.create_repo(repo, private=private, exist_ok=True)
            info = api.create_commit(repo_id=repo, operations=operations, revision=revision, create_pr=create_pr,
                                     commit_message=commit_message or f"Upload {kind} with tokentune")
        except Exception as exc:  # noqa: BLE001 - network, authentication, permissions: one line each
            raise TokenTuneError(f"cannot push to hf-hub:{repo}: {one_line(exc)}; check the network and your token "
                                 "(huggingface-cli login)") from None
    return str(getattr(info, "pr_url", None) or getattr(info, "commit_url", "") or repo)

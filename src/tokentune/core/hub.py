"""Where saved things live: local paths, ``local-dir:`` folders and ``hf-hub:`` repositories.

timm names models from elsewhere as ``hf-hub:<owner>/<repo>[@revision]`` and
``local-dir:<folder>``; tokentune accepts the same prefixes for backbones
(:func:`tokentune.create_model`), run directories (:func:`tokentune.load_trained`), deployed
exports (:func:`tokentune.load_deployed`) and peft adapters (:func:`tokentune.load_peft`).

A hub repository is fetched with ``huggingface_hub.snapshot_download`` (installed with timm; the
``hub`` extra pins it), which keeps it in the local Hugging Face cache: once fetched, it loads
without a network, also with ``HF_HUB_OFFLINE=1``. Every failure (not cached while offline, no
such repository or revision) is one :class:`~tokentune.errors.TokenTuneError` line.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional, Sequence, Tuple

from ..errors import TokenTuneError
from ..utils import one_line, require_extra

HF_HUB = "hf-hub"
LOCAL_DIR = "local-dir"
#: peft's adapter files (:mod:`tokentune.methods.lora.peft` reads and writes them)
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def split_source(name: str) -> Tuple[Optional[str], str]:
    """``"hf-hub:owner/repo"`` -> ``("hf-hub", "owner/repo")``; ``"local-dir:D"`` -> ``("local-dir", "D")``;
    anything else -> ``(None, name)`` (a timm name or a plain path)."""
    if isinstance(name, str):
        for prefix in (HF_HUB, LOCAL_DIR):
            if name.startswith(prefix + ":"):
                ident = name[len(prefix) + 1:]
                if not ident:
                    raise TokenTuneError(f"{name!r} names no {'repository' if prefix == HF_HUB else 'folder'} after "
                                         f"'{prefix}:'; write {prefix}:{'owner/repo' if prefix == HF_HUB else 'PATH'}")
                return prefix, ident
    return None, name


def split_revision(repo: str) -> Tuple[str, Optional[str]]:
    """``"owner/repo@rev"`` -> ``("owner/repo", "rev")`` (timm's spelling of a revision)."""
    repo_id, _, revision = repo.partition("@")
    return repo_id, (revision or None)


def hub_snapshot(repo: str, what: str, allow_patterns: Optional[Sequence[str]] = None) -> str:
    """The local folder of the hub repository ``repo`` (``owner/name[@revision]``), fetched if needed.

    Args:
        repo: repository id, optionally with ``@revision``.
        what: what is being loaded, for messages (``"the run"``, ``"the peft adapter"``).
        allow_patterns: only these files (globs), e.g. to skip large files that are not needed.
    """
    hub = require_extra("huggingface_hub", "hub", f"loading {what} from the Hugging Face hub")
    errors = require_extra("huggingface_hub.errors", "hub", f"loading {what} from the Hugging Face hub")
    repo_id, revision = split_revision(repo)
    try:
        return hub.snapshot_download(repo_id, revision=revision,
                                     allow_patterns=list(allow_patterns) if allow_patterns else None)
    except errors.LocalEntryNotFoundError:
        raise TokenTuneError(f"hf-hub:{repo} is not in the local Hugging Face cache and the hub cannot be reached "
                             "(offline or HF_HUB_OFFLINE=1); fetch it once on a machine with access "
                             f"(huggingface-cli download {repo_id}) or pass a local folder") from None
    except errors.RevisionNotFoundError:
        raise TokenTuneError(f"hf-hub:{repo}: the repository has no revision {revision!r}; "
                             "pass an existing branch, tag or commit after '@'") from None
    except errors.RepositoryNotFoundError:
        raise TokenTuneError(f"hf-hub:{repo}: no such repository, or it is private (log in with "
                             "huggingface-cli login); check the id, written owner/name") from None
    except errors.HFValidationError as exc:
        raise TokenTuneError(f"hf-hub:{repo} is not a valid repository id ({one_line(exc)}); "
                             "write hf-hub:owner/name[@revision]") from None
    except (errors.HfHubHTTPError, OSError) as exc:
        raise TokenTuneError(f"cannot fetch hf-hub:{repo}: {one_line(exc)}; check the network or pass a local folder") \
            from None


def resolve_location(location: str, what: str, allow_patterns: Optional[Sequence[str]] = None) -> str:
    """A local folder for ``location``: a path, ``local-dir:PATH`` or ``hf-hub:owner/repo[@rev]``."""
    location = os.fspath(location)
    source, ident = split_source(location)
    if source == HF_HUB:
        return hub_snapshot(ident, what, allow_patterns)
    return os.path.expanduser(ident)


def absolute_source(name: str) -> str:
    """``local-dir:`` names with an absolute path (a build spec names its folder from anywhere); others as they are."""
    source, ident = split_source(name)
    return f"{LOCAL_DIR}:{os.path.abspath(os.path.expanduser(ident))}" if source == LOCAL_DIR else name


# ----------------------------------------------------------------------------- portable records
def portable_path(path: str, base_dir: str) -> str:
    """``path`` as recorded in a file of ``base_dir``: relative to it (``/``-separated), never absolute.

    A record written this way stays valid when the folders move together and names no user's
    machine layout when shared; :func:`resolve_path` turns it back into a path.
    """
    path = os.path.abspath(os.path.expanduser(path))
    try:
        rel = os.path.relpath(path, os.path.abspath(base_dir))
    except ValueError:          # another drive (Windows): only the name can be kept
        rel = os.path.basename(path)
    return rel.replace(os.sep, "/")


def resolve_path(recorded: str, base_dir: str) -> str:
    """The path a record of ``base_dir`` names: relative to ``base_dir`` (as :func:`portable_path` writes);
    absolute paths (older records) as they are; a relative path that exists only from the current
    directory (older records of the Python API) from there."""
    recorded = os.path.expanduser(recorded)
    if os.path.isabs(recorded):
        return recorded
    here = os.path.normpath(os.path.join(base_dir, recorded))
    return recorded if not os.path.exists(here) and os.path.exists(recorded) else here


def _map_backbone_paths(record: Dict[str, Any], base_dir: str, to_path) -> Dict[str, Any]:
    """``record`` with ``to_path(path, base_dir)`` applied to its local paths: a ``pretrained`` weights
    file and a ``local-dir:`` model. Timm names, ``hf-hub:`` ids and booleans stay as they are."""
    out = dict(record)
    if isinstance(out.get("pretrained"), str):
        out["pretrained"] = to_path(out["pretrained"], base_dir)
    source, ident = split_source(out.get("model")) if isinstance(out.get("model"), str) else (None, None)
    if source == LOCAL_DIR:
        out["model"] = f"{LOCAL_DIR}:{to_path(ident, base_dir)}"
    return out


def portable_backbone(record: Dict[str, Any], base_dir: str) -> Dict[str, Any]:
    """``record`` (a build spec, or anything with ``model``/``pretrained`` entries) with local paths made
    relative to ``base_dir``: a ``pretrained`` weights file and a ``local-dir:`` model. Timm names,
    ``hf-hub:`` ids and booleans stay as they are."""
    return _map_backbone_paths(record, base_dir, portable_path)


def resolved_backbone(record: Dict[str, Any], base_dir: str) -> Dict[str, Any]:
    """Inverse of :func:`portable_backbone`: the recorded paths as paths to open."""
    return _map_backbone_paths(record, base_dir, resolve_path)

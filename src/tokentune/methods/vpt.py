"""VPT: visual prompt tuning (Jia et al., ECCV 2022, arXiv 2203.12119).

Reimplemented from the paper and the published behaviour of its official code (KMnP/vpt,
``src/models/vit_prompt/vit.py``; no code of it is used). ``p`` learned prompt tokens
``P in R^{p x D}`` are inserted after the prefix tokens (CLS, and timm's registers or distillation
token), before the patch tokens, *after* the position embedding (prompts have none)::

    shallow (Eq. 1-3):  x_0 = [CLS, P, E_0];  x_i = L_i(x_{i-1})  for every block i
    deep    (Eq. 4-6):  block i > 0 first replaces the prompt tokens it receives by its own P_i:
                        x = [CLS, P_i, E_{i-1}];  x_i = L_i(x)

The backbone is frozen; the prompts (and the head) train. Initialisation (reference, "random"):
``U(-v, v)`` with ``v = sqrt(6 / (3 * patch_h * patch_w + D))`` (Xavier-uniform over the patch
projection's fan), every block's prompts drawn alike. Prompt dropout (reference ``DROPOUT``,
0.0) applies to the prompts as they are inserted. No projection (reference ``PROJECT = -1``).

Prompts are *prefix tokens*: they count in ``TokenState.num_prefix`` (and
``model.tokentune.extra_prefix``), so ToMe never merges them, DyT never dispatches them and EViT,
DynamicViT and DiffRate never prune them; ToMe schedules and FLOPs see the ``p`` extra tokens.
This is what makes ``vpt+pyra`` (PYRA's open question "PYRA with other PEFT methods") and
``vpt+tome``/``vpt+evit``/``vpt+dyt`` work. The classifier reads the CLS token (the reference's
``x[:, 0]``); with ``global_pool="avg"`` timm averages every token after its own prefix tokens,
prompts included (the reference's "original" pooling of its MAE/MoCo backbones).

Deployment keeps the prompts (they are part of the computation). Parameters: ``p D`` (shallow) or
``L p D`` (deep), as the paper counts them (head excluded). Names (ours -> reference)::

    blocks.0.prompt.embeddings        [p, D]   prompt_embeddings              [1, p, D]
    blocks.{i}.prompt.embeddings      [p, D]   deep_prompt_embeddings[i - 1]  (deep, i >= 1)

:func:`load_reference_checkpoint` reads the reference's files (a whole model, backbone names mapped,
or its prompt files), every tensor checked.

Deviation: the reference keeps the frozen backbone in eval mode while training (its ``train()``
override), so backbone dropout and drop-path are off; here the whole model follows
``model.train()``, which is the same with timm's defaults (drop rates 0).
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Tuple, Union

import torch
from torch import nn

from ..core.method import Method, register_method
from ..core.state import TokenState
from ..core.vit import adapted_blocks
from ..core.weights import (
    load_reference_state,
    load_safetensors,
    load_torch_file,
    numpy_array_globals,
    rename_keys,
    state_dict_of,
)
from ..errors import TokenTuneError
from ..typecheck import check_fields

INITS = ("random",)


@dataclass
class VPTConfig:
    """Visual prompt tuning options (defaults: the reference code's configuration).

    Attributes:
        tokens: prompt length p (reference default 5; the paper picks it per task from
            1, 5, 10, 50, 100, 200).
        deep: VPT-deep (new prompts at every block, the paper's best variant) instead of
            VPT-shallow (prompts at the first block only; the reference default).
        dropout: dropout on the prompts as they are inserted (reference 0.0).
        init: prompt initialisation: ``"random"`` = U(-v, v), v = sqrt(6 / (3 patch^2 + D))
            (the reference's Xavier-uniform).
    """

    tokens: int = 5
    deep: bool = False
    dropout: float = 0.0
    init: str = "random"

    def __post_init__(self) -> None:
        check_fields(self, "vpt_")
        if self.tokens < 1:
            raise TokenTuneError(f"invalid vpt_tokens={self.tokens}: the prompt length must be at least 1")
        if not 0.0 <= self.dropout < 1.0:
            raise TokenTuneError(f"invalid vpt_dropout={self.dropout}: a dropout probability is in [0, 1)")
        if self.init not in INITS:
            raise TokenTuneError(f"unknown vpt_init {self.init!r}; choose from {', '.join(INITS)}")


class VisualPrompt(nn.Module):
    """A block's prompt plug-in: inserts (first block) or replaces (deep VPT) ``p`` prompt tokens
    right after the model's own ``start`` prefix tokens.

    Args:
        tokens: prompt length p.
        dim: embedding dimension D.
        start: the model's own prefix tokens (CLS, registers, distillation token).
        insert: insert the prompts (first block) instead of replacing the ones present.
        dropout: dropout on the prompts.
    """

    def __init__(self, tokens: int, dim: int, start: int, insert: bool, dropout: float = 0.0) -> None:
        super().__init__()
        self.embeddings = nn.Parameter(torch.zeros(tokens, dim))
        self.start, self.insert = int(start), bool(insert)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def extra_repr(self) -> str:
        return f"tokens={self.embeddings.shape[0]}, start={self.start}, insert={self.insert}"

    def forward(self, x: torch.Tensor, state: TokenState) -> Tuple[torch.Tensor, TokenState]:
        B = x.shape[0]
        p, s = self.embeddings.shape[0], self.start
        prompts = self.dropout(self.embeddings.to(x.dtype)).unsqueeze(0).expand(B, -1, -1)
        if self.insert:
            if state.size is not None or state.source is not None or state.policy is not None:
                raise TokenTuneError("VPT inserts its prompts in the first block, before any token reduction")
            return torch.cat([x[:, :s], prompts, x[:, s:]], dim=1), state.replace(num_prefix=state.num_prefix + p)
        return torch.cat([x[:, :s], prompts, x[:, s + p:]], dim=1), state


def apply_vpt(model: nn.Module, cfg: VPTConfig, ctx) -> None:
    blocks = adapted_blocks(model)
    if any(b.prompt is not None for b in blocks):
        raise TokenTuneError("this model already has prompts")
    dim, start = int(model.embed_dim), int(model.num_prefix_tokens)
    patch = model.patch_embed.patch_size
    ph, pw = (patch, patch) if isinstance(patch, int) else (int(patch[0]), int(patch[1]))
    bound = math.sqrt(6.0 / float(3 * ph * pw + dim))          # the reference's Xavier-uniform bound
    like = blocks[0].param_like()
    for i, block in enumerate(blocks if cfg.deep else blocks[:1]):
        block.prompt = VisualPrompt(cfg.tokens, dim, start, insert=i == 0, dropout=cfg.dropout).to(**like)
        with torch.no_grad():
            block.prompt.embeddings.uniform_(-bound, bound)
    model.tokentune.extra_prefix = cfg.tokens


# ----------------------------------------------------------------------------- reference checkpoints
# KMnP/vpt@4410440 builds its ViT from the ViT-pytorch port of Google's ViT (src/models/vit_backbones/vit.py,
# vit_prompt/vit.py) inside src/models/vit_models.py's ViT ("enc", head "head", an MLP whose last layer is
# "last_layer"); its trainer saves the prompts alone (trainer.save_prompt: prompt_ep{N}.pth holding numpy
# arrays). Names (reference, "enc." and "module." dropped -> ours):
_FROM_REFERENCE = [(re.compile(a), b) for a, b in [
    (r"^transformer\.embeddings\.patch_embeddings\.(weight|bias)$", r"patch_embed.proj.\1"),
    (r"^transformer\.embeddings\.position_embeddings$", "pos_embed"),
    (r"^transformer\.embeddings\.cls_token$", "cls_token"),
    (r"^transformer\.encoder\.layer\.(\d+)\.attention_norm\.(weight|bias)$", r"blocks.\1.norm1.\2"),
    (r"^transformer\.encoder\.layer\.(\d+)\.attn\.out\.(weight|bias)$", r"blocks.\1.attn.proj.\2"),
    (r"^transformer\.encoder\.layer\.(\d+)\.ffn_norm\.(weight|bias)$", r"blocks.\1.norm2.\2"),
    (r"^transformer\.encoder\.layer\.(\d+)\.ffn\.(fc1|fc2)\.(weight|bias)$", r"blocks.\1.mlp.\2.\3"),
    (r"^transformer\.encoder\.encoder_norm\.(weight|bias)$", r"norm.\1"),
    (r"^head\.last_layer\.(weight|bias)$", r"head.\1"),
]]
# attn.{query,key,value}.{weight,bias} of layer i -> their concatenation blocks.{i}.attn.qkv.{weight,bias};
# transformer.prompt_embeddings [1, p, D] (or "shallow_prompt") -> blocks.0.prompt.embeddings [p, D];
# transformer.deep_prompt_embeddings [L - 1, p, D] (or "deep_prompt") row i - 1 -> blocks.{i}.prompt.embeddings
_QKV = re.compile(r"^transformer\.encoder\.layer\.(\d+)\.attn\.(query|key|value)\.(weight|bias)$")
# the tensors the reference model has (the rest of ours, e.g. LoRA in vpt+lora, keeps its values)
_IN_REFERENCE = re.compile(r"^(cls_token|pos_embed|patch_embed\.proj\.(weight|bias)|norm\.(weight|bias)|head\.(weight|bias)|"
                           r"blocks\.\d+\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)|"
                           r"blocks\.\d+\.prompt\.embeddings)$")
_PROMPTS = re.compile(r"\.prompt\.embeddings$")


def from_reference_state_dict(state_dict: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
    """KMnP/vpt names -> ours (a full model state dict, or the trainer's prompt file); numpy arrays become tensors."""
    tensors = {k: torch.as_tensor(v) for k, v in state_dict.items() if isinstance(v, torch.Tensor) or hasattr(v, "__array__")}
    if "shallow_prompt" in tensors:                          # trainer.save_prompt's file
        tensors = {"transformer.prompt_embeddings": tensors.pop("shallow_prompt"),
                   **({"transformer.deep_prompt_embeddings": tensors.pop("deep_prompt")} if "deep_prompt" in tensors else {}),
                   **tensors}
    tensors = {re.sub(r"^(module\.)?(enc\.)?", "", k): v for k, v in tensors.items()}
    if any(k.startswith("transformer.prompt_proj.") for k in tensors):
        raise TokenTuneError("the VPT reference checkpoint projects its prompts (PROJECT > -1), which tokentune's VPT "
                             "does not; only checkpoints trained with PROJECT -1 (the default) load")
    out: Dict[str, torch.Tensor] = {}
    qkv: Dict[Tuple[str, str], Dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        m = _QKV.match(key)
        if m:
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = value
        elif key == "transformer.prompt_embeddings":
            out["blocks.0.prompt.embeddings"] = value.reshape(value.shape[-2:])
        elif key == "transformer.deep_prompt_embeddings":
            out.update({f"blocks.{i + 1}.prompt.embeddings": row for i, row in enumerate(value)})
        else:
            out.update(rename_keys({key: value}, _FROM_REFERENCE))
    for (layer, kind), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise TokenTuneError(f"the VPT reference checkpoint has only {', '.join(sorted(parts))} of layer {layer}'s "
                                 f"attention {kind}; it is damaged")
        out[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    return out


def load_reference_checkpoint(model: nn.Module, checkpoint: Union[str, os.PathLike, Mapping[str, Any]], *,
                              trust_checkpoint: bool = False) -> List[str]:
    """Load an official VPT checkpoint (KMnP/vpt; path or loaded dict) into a ``method="vpt"`` model.

    Two kinds: a whole model's state dict (backbone in the reference's ViT-pytorch names, prompts,
    a linear head): every tensor must be used and every tensor of the reference's model present
    (a PEFT or reduction method combined with VPT keeps its own tensors; returned); or the trainer's
    prompt file (``prompt_ep{N}.pth``: ``shallow_prompt`` and, for VPT-deep, ``deep_prompt`` numpy
    arrays), which loads the prompts alone. A path is read weights-only (numpy float arrays allowed);
    ``trust_checkpoint=True`` unpickles fully: only for files you trust, it can run any code.
    """
    if not any(getattr(b, "prompt", None) is not None for b in adapted_blocks(model)):
        raise TokenTuneError("this model has no prompts; build it with method='vpt' (vpt_deep=True for VPT-deep)")
    if isinstance(checkpoint, (str, os.PathLike)):
        path = os.fspath(checkpoint)
        if not os.path.isfile(path):
            raise TokenTuneError(f"checkpoint {path!r} does not exist")
        obj = load_safetensors(path, "download or write it again") if path.endswith(".safetensors") else \
            load_torch_file(path, trust_checkpoint=trust_checkpoint, allow=numpy_array_globals())
    else:
        obj = checkpoint
    if not isinstance(obj, Mapping):
        raise TokenTuneError(f"the VPT reference checkpoint holds a {type(obj).__name__}, not a state dict or prompt file")
    prompts_only = "shallow_prompt" in obj
    state = obj if prompts_only else state_dict_of(obj)
    tensors = from_reference_state_dict(state)
    return load_reference_state(model, tensors, source="VPT reference checkpoint",
                                required=_PROMPTS if prompts_only else _IN_REFERENCE,
                                fix="check the model name, num_classes, vpt_tokens and vpt_deep (the reference: "
                                    "ViT-B/16 at 224 px)")


register_method(Method(
    "vpt", VPTConfig, apply_vpt, trainable=(r"\.prompt\.",), order=14, peft=True,
    summary="VPT: learned prompt tokens after the CLS token (shallow: first block; deep: every block)"))

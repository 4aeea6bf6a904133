"""The composition layer: timm's ViT with its own submodules, a per-forward token state, and the
one place methods plug in (see docs/architecture.md).

* :mod:`.state`: ``TokenState`` (per-forward, never mutated) and ``Dispatch``;
* :mod:`.attention`: attention through timm's own ``Attention`` submodules (SDPA or softmax);
* :mod:`.block`: ``AdaptedBlock``, a timm block whose submodules are adopted, with plug-in slots;
* :mod:`.skip`: real token skipping (gather the active tokens, compute, scatter back);
* :mod:`.dispatch`: token dispatchers in general: records and activation statistics;
* :mod:`.vit`: the adapted ViT's forward, ``model.tokentune`` (``ModelInfo``), timm <-> adapted;
* :mod:`.method`: what a method is, the method and recipe registries, method specs;
* :mod:`.factory`: ``create_model``; :mod:`.deploy`: ``deploy``; :mod:`.params`: parameter counts;
* :mod:`.backbone`: timm backbones by name, hub or local file; :mod:`.weights`: safe weight files;
* :mod:`.flops`: FLOPs of a real forward, attention included.
"""

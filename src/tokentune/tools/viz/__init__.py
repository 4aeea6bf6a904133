"""Pictures: merged-token maps (ToMe/PYRA), accuracy-versus-speed charts, DyT token activation.

matplotlib is an optional dependency (``pip install 'tokentune[viz]'``). Figures are drawn with
matplotlib's object-oriented API on an Agg canvas, so no GUI backend is touched and the global
pyplot state of the caller is left alone.

* :func:`plot_merged_tokens`: run a model with source tracing on, map every token after a block
  back to the patches it stands for, and draw each merged group in the mean colour of its pixels
  with its borders (the ToMe paper's visualisation), at one or several depths.
* :func:`plot_tradeoff`: accuracy versus throughput or FLOPs across methods, from run results
  (``results.json``), run summaries and benchmark tables (:func:`tokentune.tools.measure.write_results`).
* :func:`plot_activated_tokens`, :func:`plot_activation_rates`: which patches token dispatchers
  (DyT) activate, per layer, over images.

Modules: :mod:`.common` (figures, image preparation), :mod:`.merge`, :mod:`.tradeoff`, :mod:`.dispatch`.
"""
from .common import IMAGE_SUFFIXES, TITLE_SPACE, expand_images, prepare_image
from .dispatch import dyt_activation, plot_activated_tokens, plot_activation_rates
from .merge import default_depths, plot_merged_tokens, token_groups
from .tradeoff import X_AXES, TradeoffPoint, load_tradeoff_points, plot_tradeoff

__all__ = [
    "IMAGE_SUFFIXES", "TITLE_SPACE", "TradeoffPoint", "X_AXES", "default_depths", "dyt_activation", "expand_images",
    "load_tradeoff_points", "plot_activated_tokens", "plot_activation_rates", "plot_merged_tokens", "plot_tradeoff",
    "prepare_image", "token_groups",
]

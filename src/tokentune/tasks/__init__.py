"""Tasks beyond image classification, one package each; importing this package registers them.

* :mod:`.segmentation`: semantic segmentation (UperNet on multi-level features, ADE20K, mIoU);
* :mod:`.video`: video recognition (clips as batches of frames, attentive or mean pooling, multi-view top-1).

A task defines its config dataclass, its head (a :class:`tokentune.core.task.TaskHead`), its
data, loss and evaluation, and calls ``register_task(Task(...))`` at import (see
:mod:`tokentune.core.task`).
"""
from . import segmentation, video  # noqa: F401 - registers the tasks

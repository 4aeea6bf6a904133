"""``prepare_vtab``: turn a VTAB-1k task from another form into the prepared layout tokentune reads.

The layout (:mod:`tokentune.engine.data`)::

    <out>/<task>/images/<split>/000000.<ext>
    <out>/<task>/<split>.txt             lines "images/<split>/000000.<ext> <label>"

for the splits ``train800``, ``val200`` and ``test``; ``train800val200.txt`` lists the train800
images and then the val200 images (no copies).

Sources (each split a split of the VTAB-1k task, e.g. as dumped from TensorFlow Datasets with the
``task_adaptation`` split definitions):

* a folder per split with a sub-folder per class: ``SRC/<split>/<class>/*.jpg``; class folders
  named by integers are those labels, other names are numbered in sorted order;
* a Hugging Face ``DatasetDict`` saved with ``save_to_disk`` (``SRC/dataset_dict.json``), with an
  image and a label column (``pip install 'tokentune[datasets]'``).

Split names of the source default to ``train800``, ``val200``, ``test``; ``splits`` maps others
(``{"val200": "validation"}``). Image files are copied byte for byte; images held decoded (arrays,
PIL images without their file) are written as PNG, losslessly.
"""
from __future__ import annotations

import io
import os
import shutil
from typing import Dict, List, Optional, Tuple

from ..engine.data import IMAGE_EXTENSIONS, VTAB_SPLITS, vtab_task
from ..engine.sources import IMAGE_KEYS, LABEL_KEYS, to_pil
from ..errors import TokenTuneError
from ..fileio import atomic_write_text
from ..utils import require_extra

SOURCE_SPLITS = ("train800", "val200", "test")
EXPECTED = {"train800": 800, "val200": 200}


def _folder_split(directory: str) -> List[Tuple[str, int]]:
    """``(file, label)`` of a class-per-folder split."""
    classes = sorted(d for d in os.listdir(directory) if os.path.isdir(os.path.join(directory, d)))
    if not classes:
        raise TokenTuneError(f"{directory} has no class folders; expected {directory}/<class>/*.jpg")
    numeric = all(c.isdigit() for c in classes)
    label_of = {c: (int(c) if numeric else i) for i, c in enumerate(classes)}
    items = []
    for cls in sorted(classes, key=lambda c: label_of[c]):
        for dirpath, dirnames, files in os.walk(os.path.join(directory, cls)):
            dirnames.sort()
            items.extend((os.path.join(dirpath, f), label_of[cls]) for f in sorted(files)
                         if f.lower().endswith(IMAGE_EXTENSIONS))
    return items


def _write_image(image, path_stem: str) -> str:
    """Write one image (bytes of a file, or decoded) and return the file name written."""
    if isinstance(image, dict) and image.get("bytes") is not None:
        data = image["bytes"]
        fmt = (to_pil(data).format or "PNG").lower()
        name = f"{path_stem}.{'jpg' if fmt == 'jpeg' else fmt}"
        _write_bytes(name, data)
        return name
    if isinstance(image, dict) and image.get("path") and os.path.isfile(image["path"]):
        image = image["path"]
    if isinstance(image, str):
        name = path_stem + os.path.splitext(image)[1].lower()
        shutil.copyfile(image, name)
        return name
    pil = to_pil(image)
    name = path_stem + ".png"
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    _write_bytes(name, buf.getvalue())
    return name


def _write_bytes(path: str, data: bytes) -> None:
    with open(path, "wb") as fh:      # plain writes: the list files, written last, mark a complete task
        fh.write(data)


def prepare_vtab(source: str, out_root: str, task: str, splits: Optional[Dict[str, str]] = None,
                 image_key: Optional[str] = None, label_key: Optional[str] = None) -> Dict[str, int]:
    """Write VTAB-1k task ``task`` from ``source`` into ``out_root/<task>``; returns images per split.

    Args:
        source: a folder of class-per-folder splits, or a saved Hugging Face ``DatasetDict``.
        out_root: the VTAB-1k root to write into (other tasks in it are left alone).
        task: the VTAB-1k task name (aliases accepted); labels are checked against its class count.
        splits: ``{layout split: source split}`` for source splits named otherwise.
        image_key, label_key: columns of a ``DatasetDict`` (default: found by name).
    """
    info = vtab_task(task)
    names = {s: (splits or {}).get(s, s) for s in SOURCE_SPLITS}
    unknown = sorted(set(splits or {}) - set(SOURCE_SPLITS))
    if unknown:
        raise TokenTuneError(f"unknown layout split {unknown[0]!r}; map {', '.join(SOURCE_SPLITS)} to the source's names")
    shared = sorted({n for n in names.values() if list(names.values()).count(n) > 1})
    if shared:
        both = [s for s, n in names.items() if n == shared[0]]
        raise TokenTuneError(f"the source split {shared[0]!r} is used for both {' and '.join(both)}, which would hold the "
                             "same images (and train800val200 each twice); give each layout split its own source split "
                             "(split it into two folders first, e.g. 800 and 200 images)")
    if not os.path.isdir(source):
        raise TokenTuneError(f"source {source!r} does not exist; pass a folder of split folders or a saved DatasetDict")
    hf = os.path.isfile(os.path.join(source, "dataset_dict.json"))
    if hf:
        datasets = require_extra("datasets", "datasets", "reading a saved Hugging Face DatasetDict")
        table = datasets.load_from_disk(source)
        present = list(table)
    else:
        present = sorted(d for d in os.listdir(source) if os.path.isdir(os.path.join(source, d)))
    missing = [f"{s} (as {n!r})" for s, n in names.items() if n not in present]
    if missing:
        raise TokenTuneError(f"{source} lacks the split {missing[0]} (it has {', '.join(present) or 'none'}); "
                             "name the source splits with --splits train800=NAME,val200=NAME,test=NAME")
    task_dir = os.path.join(out_root, info.name)
    counts: Dict[str, int] = {}
    lines: Dict[str, List[str]] = {}
    for split, name in names.items():
        image_dir = os.path.join(task_dir, "images", split)
        os.makedirs(image_dir, exist_ok=True)
        if hf:
            rows = table[name].cast_column(image_key or _column(table[name], IMAGE_KEYS, "image"),
                                           datasets.Image(decode=False))
            img_col = image_key or _column(rows, IMAGE_KEYS, "image")
            lab_col = label_key or _column(rows, LABEL_KEYS, "label")
            items = ((row[img_col], int(row[lab_col])) for row in rows)
        else:
            items = iter(_folder_split(os.path.join(source, name)))
        out = []
        for i, (image, label) in enumerate(items):
            if not 0 <= label < info.num_classes:
                raise TokenTuneError(f"label {label} of image {i} in split {name!r} is outside 0..{info.num_classes - 1} "
                                     f"of {info.name}; the source belongs to another task")
            written = _write_image(image, os.path.join(image_dir, f"{i:06d}"))
            out.append(f"images/{split}/{os.path.basename(written)} {label}")
        if not out:
            raise TokenTuneError(f"split {name!r} of {source} holds no images")
        lines[split], counts[split] = out, len(out)
    lines["train800val200"] = lines["train800"] + lines["val200"]
    counts["train800val200"] = len(lines["train800val200"])
    for split in VTAB_SPLITS:
        atomic_write_text(os.path.join(task_dir, f"{split}.txt"), "".join(line + "\n" for line in lines[split]))
    return counts


def _column(rows, candidates, what: str) -> str:
    names = list(getattr(rows, "column_names", []) or [])
    found = next((c for c in candidates if c in names), None)
    if found is None:
        raise TokenTuneError(f"cannot find the {what} column among {', '.join(names)}; pass --{what}-key NAME")
    return found


def unusual_counts(counts: Dict[str, int]) -> List[str]:
    """Notes on split sizes that differ from VTAB-1k's 800/200."""
    return [f"{split} has {counts[split]} images (VTAB-1k: {n})" for split, n in EXPECTED.items()
            if counts.get(split) != n]

"""Tiny segmentation datasets written to disk for the tests (ADE20K's layout and image + mask folders)."""
import os

import numpy as np
from PIL import Image


def shapes(rng, h, w, num_classes):
    """An image with a few filled rectangles and its label mask (class k drawn in colour k)."""
    mask = np.zeros((h, w), dtype=np.uint8)
    for _ in range(3):
        k = int(rng.integers(1, num_classes + 1))
        y, x = int(rng.integers(0, h - 4)), int(rng.integers(0, w - 4))
        mask[y:y + int(rng.integers(4, h // 2 + 4)), x:x + int(rng.integers(4, w // 2 + 4))] = k
    palette = rng.integers(0, 256, size=(num_classes + 1, 3), dtype=np.uint8)
    image = palette[mask] + rng.integers(0, 20, size=(h, w, 3), dtype=np.uint8)
    return image, mask


def write_ade(root, num_train=4, num_val=2, size=(40, 48), num_classes=150, seed=0):
    """ADEChallengeData2016-like folders: labels 1..num_classes, 0 = other (ignored)."""
    rng = np.random.default_rng(seed)
    for split, n in (("training", num_train), ("validation", num_val)):
        os.makedirs(os.path.join(root, "images", split), exist_ok=True)
        os.makedirs(os.path.join(root, "annotations", split), exist_ok=True)
        for i in range(n):
            image, mask = shapes(rng, size[0], size[1], min(num_classes, 5))
            Image.fromarray(image).save(os.path.join(root, "images", split, f"ADE_{split}_{i:04d}.jpg"))
            Image.fromarray(mask, "L").save(os.path.join(root, "annotations", split, f"ADE_{split}_{i:04d}.png"))
    return root


def write_folder(root, num_classes=3, num_train=4, num_test=2, size=(36, 36), seed=0):
    """<root>/<split>/images + masks with labels 0..num_classes-1 (255 ignored)."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", num_train), ("test", num_test)):
        os.makedirs(os.path.join(root, split, "images"), exist_ok=True)
        os.makedirs(os.path.join(root, split, "masks"), exist_ok=True)
        for i in range(n):
            image, mask = shapes(rng, size[0], size[1], num_classes)
            mask = (mask % num_classes).astype(np.uint8)
            Image.fromarray(image).save(os.path.join(root, split, "images", f"{i:03d}.png"))
            Image.fromarray(mask, "L").save(os.path.join(root, split, "masks", f"{i:03d}.png"))
    return root

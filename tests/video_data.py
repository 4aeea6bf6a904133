"""Tiny videos written to disk for the tests: moving squares, as video files (PyAV) or frame folders."""
import os

import numpy as np
from PIL import Image


def moving_square(label, frames=20, size=(36, 44), seed=0):
    """Frames [T, H, W, 3] uint8: a bright square moving right (label 0) or down (label 1)."""
    rng = np.random.default_rng(seed)
    h, w = size
    out = rng.integers(0, 40, size=(frames, h, w, 3), dtype=np.uint8)
    for t in range(frames):
        y, x = (h // 3, (t * 2) % (w - 8)) if label == 0 else ((t * 2) % (h - 8), w // 3)
        out[t, y:y + 8, x:x + 8] = 230
    return out


def write_video(path, frames, fps=25):
    import av

    with av.open(path, "w") as container:
        stream = container.add_stream("mjpeg", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuvj420p"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_frames(folder, frames):
    os.makedirs(folder, exist_ok=True)
    for i, f in enumerate(frames):
        Image.fromarray(f).save(os.path.join(folder, f"img_{i:05d}.jpg"), quality=95)


def write_lists(root, per_split=(4, 2), frames=20, as_video=True):
    """<root>/train.txt and <root>/val.txt listing clips of 2 classes."""
    os.makedirs(os.path.join(root, "clips"), exist_ok=True)
    for split, n in zip(("train", "val"), per_split):
        lines = []
        for i in range(n):
            label = i % 2
            clip = moving_square(label, frames, seed=hash((split, i)) % 1000)
            rel = f"clips/{split}_{i}" + (".avi" if as_video else "")
            if as_video:
                write_video(os.path.join(root, rel), clip)
            else:
                write_frames(os.path.join(root, rel), clip)
            lines.append(f"{rel} {label}")
        with open(os.path.join(root, f"{split}.txt"), "w") as fh:
            fh.write("\n".join(lines) + "\n")
    return root

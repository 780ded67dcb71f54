"""Deterministic photo-like inputs: smooth gradients, texture and noise (codecs work as
hard as on real photos), cached on disk between runs."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np


def photo(width: int, height: int, seed: int) -> np.ndarray:
    """A colour image with gradients, soft shapes, fine texture and sensor-like noise."""
    rng = np.random.default_rng(seed)
    # Build at a quarter size and enlarge: smooth structure is cheap to make that way.
    small_w, small_h = max(8, width // 4), max(8, height // 4)
    yy, xx = np.mgrid[0:small_h, 0:small_w].astype(np.float32)
    base = np.zeros((small_h, small_w, 3), np.float32)
    for channel in range(3):
        phase = rng.uniform(0, 6.28, 3)
        base[..., channel] = (0.45 + 0.25 * np.sin(xx / small_w * rng.uniform(2, 7) + phase[0])
                              * np.cos(yy / small_h * rng.uniform(2, 7) + phase[1])
                              + 0.15 * np.sin((xx + yy) / small_w * 20 + phase[2]))
    for _ in range(12):  # soft blobs and hard-edged shapes
        cx, cy = rng.uniform(0, small_w), rng.uniform(0, small_h)
        radius = rng.uniform(0.03, 0.2) * small_w
        colour = rng.uniform(-0.3, 0.3, 3).astype(np.float32)
        mask = ((xx - cx) ** 2 + (yy - cy) ** 2 < radius ** 2).astype(np.float32)
        base += mask[..., None] * colour
    image = cv2.resize(base, (width, height), interpolation=cv2.INTER_CUBIC)
    texture = rng.normal(0, 0.04, (height // 2 + 1, width // 2 + 1, 1)).astype(np.float32)
    image += cv2.resize(texture, (width, height), interpolation=cv2.INTER_LINEAR)[..., None]
    image += rng.normal(0, 0.015, (height, width, 3)).astype(np.float32)
    return np.clip(image * 255, 0, 255).astype(np.uint8)


def make_inputs(folder: Path, name: str, count: int, width: int, height: int,
                extension: str) -> list[Path]:
    """``count`` distinct images of one size in ``folder`` (made once, then reused)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{name}-{index:03d}{extension}" for index in range(count)]
    missing = [path for path in paths if not path.exists()]
    if missing:
        bases = [photo(width, height, seed) for seed in range(min(4, count))]
        for path in missing:
            index = paths.index(path)
            image = bases[index % len(bases)]
            # Variants: shifted and flipped copies keep every file distinct and cheap to make.
            image = np.roll(image, shift=(index * 37) % height, axis=0)
            if index % 2:
                image = image[:, ::-1]
            params = [cv2.IMWRITE_JPEG_QUALITY, 90] if extension == ".jpg" else []
            temp = path.with_name("." + path.name)
            cv2.imwrite(str(temp) + extension, image, params)
            Path(str(temp) + extension).rename(path)
    return paths

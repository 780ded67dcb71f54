"""Operations on the pixels' values: blur, sharpen, grayscale.

    blur=K[,S]        Gaussian blur, K x K kernel (even K -> K+1; K = 0: from sigma S)
    sharpen=S[,A]     unsharp mask: img + A * (img - GaussianBlur(img, (0, 0), S))
    grayscale[=V]     luminance as cv2.cvtColor(..., COLOR_BGR2GRAY) gives it

Alpha is left alone: a grayscale image with alpha keeps four channels (B = G = R), and
sharpening touches only the colour channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from imgserver.images.blur import gaussian_blur
from imgserver.images.operation import (
    NO,
    Context,
    Operation,
    alpha_split,
    integer,
    needs,
    number,
    parts,
)


@dataclass(frozen=True)
class Blur(Operation, name="blur", example="blur=5",
           summary="Gaussian blur with a KxK kernel (an even K is raised to K+1); blur=K,S "
                   "sets sigma; K = 0 computes the kernel from sigma"):
    """Gaussian blur, ``ksize`` x ``ksize`` (odd, or 0: from sigma), ``sigma`` (0: from ksize)."""

    ksize: int
    sigma: float = 0.0

    @classmethod
    def parse(cls, value: str | None, context: Context) -> Blur:
        """``blur=K`` or ``blur=K,S``."""
        form = "blur=K or blur=K,S"
        pieces = parts(needs(value, form), 2, form)
        ksize = integer(pieces[0], "kernel size", 0)
        sigma = 1.0 if ksize == 0 else 0.0  # K = 0 without S: OpenCV's kernel for sigma 1
        if len(pieces) == 2:
            sigma = number(pieces[1], "sigma", above=0)
        if ksize % 2 == 0 and ksize > 0:
            ksize += 1  # OpenCV needs an odd kernel; the SPEC raises an even K to K+1
        return cls(ksize, sigma)

    def apply(self, image: np.ndarray) -> np.ndarray:
        """``cv2.GaussianBlur`` with this kernel, at a cost independent of its size."""
        return gaussian_blur(image, self.ksize, self.sigma)


@dataclass(frozen=True)
class Sharpen(Operation, name="sharpen", example="sharpen=1.5,0.8",
              summary="unsharp mask with sigma S (0 < S <= 100) and amount A (0 < A <= 10, "
                      "default 1)"):
    """Unsharp mask: ``img + amount * (img - GaussianBlur(img, (0, 0), sigma))``."""

    sigma: float
    amount: float = 1.0

    @classmethod
    def parse(cls, value: str | None, context: Context) -> Sharpen:
        """``sharpen=S`` or ``sharpen=S,A``."""
        form = "sharpen=S or sharpen=S,A"
        pieces = parts(needs(value, form), 2, form)
        sigma = number(pieces[0], "sigma", above=0, at_most=100)
        amount = number(pieces[1], "amount", above=0, at_most=10) if len(pieces) == 2 else 1.0
        return cls(sigma, amount)

    def apply(self, image: np.ndarray) -> np.ndarray:
        """The colour channels sharpened, rounded and clipped to their depth; alpha as is."""
        colour, alpha = alpha_split(image)
        blurred = gaussian_blur(np.ascontiguousarray(colour), 0, self.sigma)
        sharp = cv2.addWeighted(colour, 1 + self.amount, blurred, -self.amount, 0,
                                dtype=cv2.CV_32F)
        top = np.iinfo(image.dtype).max
        result = np.clip(np.rint(sharp), 0, top).astype(image.dtype)
        if alpha is None:
            return result
        return np.dstack([result.reshape(*result.shape[:2], -1), alpha])


@dataclass(frozen=True)
class Grayscale(Operation, name="grayscale", example="grayscale",
                summary="luminance only (one channel, or B = G = R with the alpha kept); "
                        "None, false or False: colour stays"):
    """Luminance, as ``cv2.cvtColor(..., COLOR_BGR2GRAY)`` gives it."""

    @classmethod
    def parse(cls, value: str | None, context: Context) -> Grayscale | None:
        """``grayscale`` or ``grayscale=V``; None for V in None, false, False."""
        return None if value is not None and value.strip() in NO else cls()

    def apply(self, image: np.ndarray) -> np.ndarray:
        """One channel of luminance; with alpha, four channels: B = G = R, alpha kept."""
        if image.ndim == 2:
            return image
        colour, alpha = alpha_split(image)
        grey = cv2.cvtColor(np.ascontiguousarray(colour), cv2.COLOR_BGR2GRAY) \
            if colour.shape[2] == 3 else colour[..., 0]
        if alpha is None:
            return grey
        return cv2.merge([grey, grey, grey, np.ascontiguousarray(alpha)])

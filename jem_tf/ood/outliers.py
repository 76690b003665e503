"""Images the library makes from in-distribution images to choose an OOD detector: outliers and shifts.

An OOD detector is chosen (:func:`jem_tf.ood.select_detector`) on the validation split and on images made
from it here, never on a reported OOD set. The made images come in two roles, and the role is part of the
rule:

* **outliers** (:data:`OUTLIER_KINDS`): inputs a deployment must *flag*; a candidate detector is ranked
  by how well it separates the validation images from each of them (its worst AUROC);
* **accepted shifts** (:data:`ACCEPTED_SHIFTS`): mild covariate shifts a deployment usually wants
  *accepted* (a blur, a lower contrast, a small translation). They never count against a candidate; the
  selection reports how many of them each candidate would accept at its threshold.

Which kind plays which role is the user's to decide (``select_detector(outlier_kinds=...,
accepted_shifts=...)``, ``python -m jem_tf.export --ood-outlier-kinds ... --ood-accepted-shifts ...``): a
built-in name of :data:`KINDS`, or in Python a ``{name: function}`` mapping whose functions take
``(images, *, value_range, seed)`` and return images of the same shape.
"""

from __future__ import annotations

from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

KindFunction = Callable[..., np.ndarray]
Kinds = Union[Sequence[str], Mapping[str, KindFunction]]


def _blurred(images, *, value_range, rng):
    """A 5x5 Gaussian blur (sigma = H / 16 pixels, at least 0.75): simpler than the data."""
    n, h, w, c = images.shape
    sigma = max(h / 16.0, 0.75)
    taps = np.exp(-0.5 * (np.arange(-2, 3) / sigma) ** 2)
    taps /= taps.sum()
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)), mode="edge")
    rows = sum(t * padded[:, i:i + h] for i, t in enumerate(taps))
    return sum(t * rows[:, :, i:i + w] for i, t in enumerate(taps))


def _low_contrast(images, *, value_range, rng):
    """Pixel values pulled to the range's midpoint: ``mid + 0.3 (x - mid)``."""
    mid = (value_range[0] + value_range[1]) / 2.0
    return mid + 0.3 * (images - mid)


def _translated(images, *, value_range, rng):
    """Each image moved by ``max(1, round(H / 14))`` pixels up, down, left or right (edges replicated)."""
    n, h, w, c = images.shape
    step = max(1, int(round(h / 14.0)))
    padded = np.pad(images, ((0, 0), (step, step), (step, step), (0, 0)), mode="edge")
    offsets = [(0, step), (2 * step, step), (step, 0), (step, 2 * step)]
    out = np.empty_like(images)
    for i, direction in enumerate(rng.integers(0, 4, size=n)):
        r, q = offsets[direction]
        out[i] = padded[i, r:r + h, q:q + w]
    return out


def _inverted(images, *, value_range, rng):
    """``low + high - x``."""
    return value_range[0] + value_range[1] - images


def _patch_shuffled(images, *, value_range, rng):
    """The image cut into a 4x4 grid of patches (2x2 below 16 pixels) and the patches permuted: local
    texture kept, global shape destroyed."""
    n, h, w, c = images.shape
    grid = 4 if min(h, w) >= 16 else 2
    ph, pw = h // grid, w // grid
    out = images.copy()
    for i in range(n):
        order = rng.permutation(grid * grid)
        patches = [images[i, r * ph:(r + 1) * ph, q * pw:(q + 1) * pw] for r in range(grid) for q in range(grid)]
        for slot, source in enumerate(order):
            r, q = divmod(slot, grid)
            out[i, r * ph:(r + 1) * ph, q * pw:(q + 1) * pw] = patches[source]
    return out


def _noised(images, *, value_range, rng):
    """Gaussian noise of std 0.3 x the range width added."""
    return images + rng.normal(0.0, 0.3 * (value_range[1] - value_range[0]), size=images.shape)


def _outlined(images, *, value_range, rng):
    """The image's edges: the Sobel gradient magnitude, scaled per image to the full range (the data seen
    as a line drawing: same shapes, different rendering)."""
    low, high = value_range
    unit = (images - low) / (high - low)
    n, h, w, c = images.shape
    padded = np.pad(unit, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")

    def at(dr, dq):
        return padded[:, 1 + dr:1 + dr + h, 1 + dq:1 + dq + w]

    gx = (at(-1, 1) + 2 * at(0, 1) + at(1, 1)) - (at(-1, -1) + 2 * at(0, -1) + at(1, -1))
    gy = (at(1, -1) + 2 * at(1, 0) + at(1, 1)) - (at(-1, -1) + 2 * at(-1, 0) + at(-1, 1))
    magnitude = np.sqrt(gx ** 2 + gy ** 2)
    peak = magnitude.max(axis=(1, 2, 3), keepdims=True)
    return low + (high - low) * magnitude / np.maximum(peak, 1e-12)


def _mosaic(images, *, value_range, rng):
    """A 2x2 grid of four images (the image and three others, each shrunk by 2x2 averaging): the data's
    parts at half their scale, four to a frame."""
    n, h, w, c = images.shape
    hh, hw = h // 2, w // 2
    small = images[:, :2 * hh, :2 * hw].reshape(n, hh, 2, hw, 2, c).mean(axis=(2, 4))
    out = np.repeat(np.repeat(small, 2, axis=1), 2, axis=2)
    out = np.pad(out, ((0, 0), (0, h - 2 * hh), (0, w - 2 * hw), (0, 0)), mode="edge")
    for i in range(n):
        picks = [i, *rng.integers(0, n, size=3)]
        for slot, source in enumerate(picks):
            r, q = divmod(slot, 2)
            out[i, r * hh:(r + 1) * hh, q * hw:(q + 1) * hw] = small[source]
    return out


def _coarse(images, *, value_range, rng):
    """Four of the image's own pixel colours (picked at random) in its corners, pulled towards the first of them
    by a random factor in [0, 1] (0: that one colour everywhere) and blended bilinearly from corner to corner:
    the data's colours with no detail at all (flat and low-frequency inputs, which a density can rank as the
    most typical of all)."""
    n, h, w, c = images.shape
    pixels = images.reshape(n, h * w, c)
    grid = np.take_along_axis(pixels, rng.integers(0, h * w, size=(n, 4, 1)), axis=1).reshape(n, 2, 2, c)
    first = grid[:, :1, :1]
    grid = first + rng.uniform(0.0, 1.0, size=(n, 1, 1, 1)) * (grid - first)
    rows = np.linspace(0.0, 1.0, h)[None, :, None, None]
    cols = np.linspace(0.0, 1.0, w)[None, None, :, None]
    top = grid[:, :1, :1] * (1 - cols) + grid[:, :1, 1:] * cols
    bottom = grid[:, 1:, :1] * (1 - cols) + grid[:, 1:, 1:] * cols
    return top * (1 - rows) + bottom * rows


KINDS: Dict[str, KindFunction] = {
    "blurred": _blurred, "low_contrast": _low_contrast, "translated": _translated, "inverted": _inverted,
    "patch_shuffled": _patch_shuffled, "noised": _noised, "outlined": _outlined, "mosaic": _mosaic,
    "coarse": _coarse,
}


def make(kind: str, images: np.ndarray, *, value_range: Sequence[float] = (-1.0, 1.0), seed: int = 0,
         function: Optional[KindFunction] = None) -> np.ndarray:
    """``kind`` made from ``images`` ``[N, H, W, C]`` (a built-in of :data:`KINDS`, or ``function``),
    float32, clipped to ``value_range``; the same seed gives the same images."""
    if function is None and kind not in KINDS:
        raise ValueError(f"Unknown outlier or shift kind {kind!r}; expected one of {sorted(KINDS)} "
                         "(or pass your own as {name: function})")
    images = np.asarray(images, np.float32)
    if images.ndim != 4:
        raise ValueError(f"Expected images [N, H, W, C]; received shape {images.shape}")
    low, high = (float(v) for v in value_range)
    if function is None:
        made = KINDS[kind](images, value_range=(low, high), rng=np.random.default_rng(seed))
    else:
        made = function(images, value_range=(low, high), seed=seed)
    made = np.asarray(made, np.float32)
    if made.shape != images.shape or not np.all(np.isfinite(made)):
        raise ValueError(f"Kind {kind!r} must return finite images of shape {images.shape}; "
                         f"received shape {made.shape}")
    return np.clip(made, low, high)


def resolve(kinds: Kinds, *, role: str) -> Tuple[Tuple[str, ...], Dict[str, KindFunction]]:
    """``(names, {name: function})`` of ``kinds``: built-in names, or a ``{name: function}`` mapping (whose
    names may also be built-in names, with ``function=None`` meaning the built-in)."""
    if isinstance(kinds, str):
        raise ValueError(f"{role} must be a list of kind names or a {{name: function}} mapping; received {kinds!r}")
    items = list(kinds.items()) if isinstance(kinds, Mapping) else [(name, None) for name in kinds]
    functions = {}
    for name, function in items:
        if function is None and name not in KINDS:
            raise ValueError(f"Unknown {role} kind {name!r}; expected one of {sorted(KINDS)} "
                             "(or pass your own as {name: function})")
        if function is not None and not callable(function):
            raise ValueError(f"{role} kind {name!r} must map to a function; received {function!r}")
        if name in functions:
            raise ValueError(f"{role} kind {name!r} is given twice")
        functions[name] = function
    return tuple(functions), functions

"""The ``sample`` signature's bounds and the ``classify``/``energy`` batch bound of an export (checked at export time
and enforced in the graph; see :func:`jem_tf.serving.build_serving_module`)."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

from jem_tf.choices import MAX_N_STEPS_LIMIT
from jem_tf.errors import UsageError

# Hard ceilings of the sample signature's bounds, whatever the export asks for: the samples of one request
# (max_num_samples x H x W x C float32; SGLD's activations and gradients need a multiple of that) must fit in
# 1 GiB, and a request runs at most MAX_N_STEPS_LIMIT (100,000) SGLD steps.
MAX_SAMPLE_BYTES = 2 ** 30
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def max_num_samples_limit(image_shape: Sequence[int]) -> int:
    """The largest ``max_num_samples`` allowed for images of ``image_shape``: ``MAX_SAMPLE_BYTES`` (1 GiB) of
    float32 samples per request."""
    return MAX_SAMPLE_BYTES // (4 * int(np.prod(image_shape)))


def check_max_batch_size(model, max_batch_size: int) -> int:
    """``max_batch_size`` of the ``classify`` and ``energy`` signatures, checked: an int in ``[1,
    max_num_samples_limit(image_shape)]`` (1 GiB of float32 images per request); ``UsageError`` (a
    ``ValueError``) naming it."""
    limit = max_num_samples_limit(model.image_shape)
    if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or not 1 <= max_batch_size <= limit:
        raise UsageError(f"`max_batch_size` must be an int in [1, {limit}] for images of shape "
                         f"{list(model.image_shape)} (1 GiB of float32 images per request); "
                         f"received {max_batch_size!r}")
    return max_batch_size


def sample_limits(model, *, max_num_samples: int = 256, max_n_steps: int = 1000,
                  max_step_size: Optional[float] = None, max_noise_std: Optional[float] = None) -> dict:
    """The ``sample`` signature's upper bounds for ``model``, checked (``UsageError``, a ``ValueError``, naming the
    bad value) and with the defaults of ``max_step_size`` and ``max_noise_std`` filled in (see
    :func:`build_serving_module`)."""
    if not (isinstance(max_num_samples, int) and max_num_samples >= 1):
        raise UsageError(f"`max_num_samples` must be an int >= 1; received {max_num_samples!r}")
    limit = max_num_samples_limit(model.image_shape)
    if max_num_samples > limit:
        raise UsageError(f"`max_num_samples` must be <= {limit} for images of shape {list(model.image_shape)} (1 GiB "
                         f"of float32 samples per request); received {max_num_samples!r}")
    if not (isinstance(max_n_steps, int) and 1 <= max_n_steps <= MAX_N_STEPS_LIMIT):
        raise UsageError(f"`max_n_steps` must be an int in [1, {MAX_N_STEPS_LIMIT}]; received {max_n_steps!r}")
    sampler, (low, high) = model.sampler, model.value_range
    limits = {"max_num_samples": max_num_samples, "max_n_steps": max_n_steps}
    for name, value, trained, default in [
            ("max_step_size", max_step_size, sampler.step_size, 10.0 * sampler.step_size),
            ("max_noise_std", max_noise_std, sampler.noise_std, max(10.0 * sampler.noise_std, high - low))]:
        value = default if value is None else value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(f"`{name}` must be a number; received {value!r}")
        if not (math.isfinite(value) and 0 < value <= _FLOAT32_MAX):
            raise UsageError(f"`{name}` must be finite (as float32) and > 0; received {value!r}")
        if value < trained:
            raise UsageError(f"`{name}` must be >= the trained sampler's {name[4:]} {trained!r} (the signature's "
                             f"default); received {value!r}")
        limits[name] = float(value)
    return limits

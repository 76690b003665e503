"""precision="auto": a measured probe decides, never choosing a 16-bit precision that is not clearly faster."""

import pytest

from jem_tf import small_cnn
from jem_tf.precision import resolve_precision, time_jem_step


def tiny_backbone():
    return small_cnn(num_classes=3, input_shape=(8, 8, 1), width=4, stages=1, seed=0)


def test_explicit_precisions_pass_through_without_a_probe():
    for precision in ("float32", "mixed_bfloat16", "mixed_float16"):
        chosen, report = resolve_precision(precision, backbone=None, batch_size=8, log=None)
        assert chosen == precision and report == {"precision": precision, "reason": "set explicitly"}


def test_auto_measures_each_candidate_and_logs_its_choice():
    lines = []
    chosen, report = resolve_precision("auto", backbone=tiny_backbone(), batch_size=16, log=lines.append)
    seconds = report["probe_seconds_per_step"]
    assert set(seconds) == {"float32", "mixed_bfloat16"} and all(s > 0 for s in seconds.values())
    assert chosen == report["precision"] in seconds
    if chosen != "float32":  # only when clearly faster than float32
        assert seconds[chosen] * 1.15 <= seconds["float32"]
    assert len(lines) == 1 and lines[0].startswith(f"precision auto -> {chosen}: ") and "ms" in lines[0]


def test_auto_never_picks_16_bits_without_the_required_speedup():
    chosen, report = resolve_precision("auto", backbone=tiny_backbone(), batch_size=8, min_speedup=1e6, log=None)
    assert chosen == "float32" and "no 16-bit precision beat float32" in report["reason"]


def test_probe_times_a_real_step_and_rejects_bad_arguments():
    assert 0 < time_jem_step(tiny_backbone(), batch_size=4, repeats=2, warmup=1) < 10
    with pytest.raises(ValueError, match="batch_size"):
        resolve_precision("auto", backbone=tiny_backbone(), batch_size=0)
    with pytest.raises(ValueError, match="float32"):
        resolve_precision("auto", backbone=tiny_backbone(), batch_size=4, candidates=("mixed_bfloat16",))

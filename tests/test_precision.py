"""jem_tf.training.precision: precision "auto" decided by a measured probe, cached per machine kind."""

import json
import os

import pytest

from jem_tf import small_cnn
from jem_tf.training.precision import machine_kind, resolve_precision, time_jem_step


def tiny_backbone():
    return small_cnn(num_classes=3, input_shape=(8, 8, 1), width=4, stages=1, seed=0)


def test_explicit_precisions_pass_through_without_a_probe():
    for precision in ("float32", "mixed_bfloat16", "mixed_float16"):
        chosen, report = resolve_precision(precision, backbone=None, batch_size=8, log=None)
        assert chosen == precision and report == {"precision": precision, "reason": "set explicitly"}


def test_auto_measures_each_candidate_and_logs_its_choice(bfloat16_machine):
    lines = []
    chosen, report = resolve_precision("auto", backbone=tiny_backbone(), batch_size=16, log=lines.append,
                                       cache_dir=None)
    assert report["source"] == "measured" and report["machine"] == bfloat16_machine
    seconds = report["probe_seconds_per_step"]
    assert set(seconds) == {"float32", "mixed_bfloat16"} and all(s > 0 for s in seconds.values())
    assert chosen == report["precision"] in seconds
    if chosen != "float32":  # only when clearly faster than float32
        assert seconds[chosen] * 1.5 <= seconds["float32"]
    assert len(lines) == 1 and lines[0].startswith(f"precision auto -> {chosen}: ") and "ms" in lines[0]


@pytest.fixture
def bfloat16_machine(monkeypatch):
    """This machine as one with bfloat16 hardware (so that the probe runs whatever CPU runs the tests)."""
    machine = {**machine_kind(), "cpu_flags": ["amx_bf16"]}
    monkeypatch.setattr("jem_tf.training.precision.machine_kind", lambda: machine)
    return machine


def test_auto_decides_once_per_machine_kind_and_workload(tmp_path, monkeypatch, bfloat16_machine):
    lines = []
    first, report = resolve_precision("auto", backbone=tiny_backbone(), batch_size=8, log=lines.append,
                                      cache_dir=str(tmp_path))
    (cached,) = os.listdir(tmp_path)
    assert "cached in" in lines[0] and json.load(open(tmp_path / cached))["precision"] == first
    # The next run reads the decision, whatever the probe would now measure (e.g. beside a busy CPU).
    monkeypatch.setattr("jem_tf.training.precision.time_jem_steps", lambda *a, **k: pytest.fail("probed again"))
    again, cached_report = resolve_precision("auto", backbone=tiny_backbone(), batch_size=8, log=lines.append,
                                             cache_dir=str(tmp_path))
    assert again == first and cached_report["source"] == str(tmp_path / cached)
    assert lines[1].startswith(f"precision auto -> {first}: ") and "decided on this machine kind" in lines[1]
    # Another workload (batch size) or machine kind is decided on its own.
    monkeypatch.setattr("jem_tf.training.precision.time_jem_steps",
                        lambda backbones, **k: {name: 1.0 if name == "float32" else 0.5 for name in backbones})
    assert resolve_precision("auto", backbone=tiny_backbone(), batch_size=4, log=None,
                             cache_dir=str(tmp_path))[0] == "mixed_bfloat16"
    monkeypatch.setattr("jem_tf.training.precision.machine_kind", lambda: {**bfloat16_machine, "cpu": "another"})
    assert resolve_precision("auto", backbone=tiny_backbone(), batch_size=8, log=None,
                             cache_dir=str(tmp_path))[0] == "mixed_bfloat16"
    assert len(os.listdir(tmp_path)) == 3
    # A damaged cache file is measured again and rewritten.
    monkeypatch.undo()
    monkeypatch.setattr("jem_tf.training.precision.machine_kind", lambda: bfloat16_machine)
    (tmp_path / cached).write_text("{not json")
    resolve_precision("auto", backbone=tiny_backbone(), batch_size=8, log=None, cache_dir=str(tmp_path))
    assert json.load(open(tmp_path / cached))["precision"] in ("float32", "mixed_bfloat16")


def test_auto_never_picks_16_bits_without_the_required_speedup(bfloat16_machine):
    chosen, report = resolve_precision("auto", backbone=tiny_backbone(), batch_size=8, min_speedup=1e6, log=None,
                                       cache_dir=None)
    assert chosen == "float32" and "no 16-bit precision beat float32" in report["reason"]


def test_probe_times_a_real_step_and_rejects_bad_arguments():
    assert 0 < time_jem_step(tiny_backbone(), batch_size=4, repeats=2, warmup=1) < 10
    with pytest.raises(ValueError, match="batch_size"):
        resolve_precision("auto", backbone=tiny_backbone(), batch_size=0)
    with pytest.raises(ValueError, match="float32"):
        resolve_precision("auto", backbone=tiny_backbone(), batch_size=4, candidates=("mixed_bfloat16",))


def test_auto_is_float32_unmeasured_without_bfloat16_hardware(monkeypatch):
    monkeypatch.setattr("jem_tf.training.precision.machine_kind",
                        lambda: {"cpu": "old", "cpu_flags": ["avx512f"], "gpus": []})
    monkeypatch.setattr("jem_tf.training.precision.time_jem_steps", lambda *a, **k: pytest.fail("probed"))
    lines = []
    chosen, report = resolve_precision("auto", backbone=tiny_backbone(), batch_size=8, log=lines.append)
    assert chosen == "float32" and report["source"] == "hardware" and "no bfloat16 instructions" in lines[0]

"""`--mixed_precision auto` (issue 18): measured, cached, never a slower candidate, recorded in training_info.json;
explicit values and accelerate's config unchanged."""

from __future__ import annotations

import json

import pytest
import torch

from flowers_ddpm.cli import main
from flowers_ddpm.config.loading import build_config
from flowers_ddpm.experiments.benchmark import model_probe
from flowers_ddpm.experiments.sweep import plan_trials
from flowers_ddpm.training.device import bf16_supported
from flowers_ddpm.training.precision import (
    Variant,
    candidates,
    choose,
    describe,
    measure_candidates,
    resolve_mixed_precision,
    time_variants,
)

from .conftest import tiny_train_args

CPU = torch.device("cpu")
PROBE = model_probe("tiny", 16)


class FakeTimer:
    """Stands in for timing real steps: given seconds per step for each candidate, counts its calls."""

    def __init__(self, seconds: dict):
        self.seconds, self.calls = seconds, 0

    def __call__(self, names):
        self.calls += 1
        return {name: self.seconds[name] for name in names}


def resolve(timer, cache_dir, choices=("no", "bf16"), batch_size=4, setting="auto"):
    return resolve_mixed_precision(setting, CPU, PROBE, batch_size, 16, timer=timer, choices=list(choices),
                                   cache_dir=cache_dir)


@pytest.mark.parametrize("seconds, expected", [
    ({"no": 1.0, "bf16": 2.0}, "no"),  # bf16 slower (as under load on a bf16 CPU): not chosen
    ({"no": 1.0, "bf16": 0.5}, "bf16"),  # twice as fast: chosen
    ({"no": 1.0, "bf16": 0.95}, "no"),  # 5% faster is not a clear margin: fp32
    ({"no": 1.0, "bf16": 0.5, "fp16": 0.48}, "bf16"),  # fp16 within 10% of bf16: the safer bf16
    ({"no": 1.0, "bf16": 0.9, "fp16": 0.5}, "fp16"),  # fp16 clearly fastest
])
def test_auto_picks_the_fastest_only_by_a_clear_margin_and_never_a_slower_candidate(seconds, expected, tmp_path):
    timer = FakeTimer(seconds)
    choice = resolve(timer, tmp_path, choices=tuple(seconds))
    assert (choice.precision, choice.how, timer.calls) == (expected, "measured", 1)
    assert choice.seconds_per_step == seconds
    assert choose(seconds) == expected


def test_the_measured_choice_is_cached_per_model_and_batch_and_reused(tmp_path):
    timer = FakeTimer({"no": 1.0, "bf16": 0.5})
    first = resolve(timer, tmp_path)
    again = resolve(FakeTimer({"no": 1.0, "bf16": 9.0}), tmp_path)  # would say fp32 if it were asked
    assert (first.how, again.how, again.precision) == ("measured", "cached", "bf16")
    assert again.seconds_per_step == {"no": 1.0, "bf16": 0.5}
    other_batch = FakeTimer({"no": 1.0, "bf16": 2.0})
    assert resolve(other_batch, tmp_path, batch_size=8).precision == "no" and other_batch.calls == 1
    assert len(list(tmp_path.glob("mixed_precision-*.json"))) == 2
    for path in tmp_path.glob("mixed_precision-*.json"):  # a damaged entry is measured again, not trusted
        path.write_text("{not json")
    remeasured = FakeTimer({"no": 1.0, "bf16": 2.0})
    assert resolve(remeasured, tmp_path).precision == "no" and remeasured.calls == 1


def test_a_single_candidate_is_not_timed(tmp_path):
    timer = FakeTimer({"no": 1.0})
    choice = resolve(timer, tmp_path, choices=("no",))
    assert (choice.precision, choice.how, timer.calls) == ("no", "only candidate", 0)
    assert not list(tmp_path.iterdir())
    # the CPU's candidates: fp32, and bf16 only where oneDNN has bf16 kernels (AVX512-BF16/AMX); fp16 only on CUDA.
    # On a CPU without bf16 (e.g. AVX2 only) auto is therefore fp32 without any timing.
    assert candidates(CPU) == (["no", "bf16"] if bf16_supported(CPU) else ["no"])


def test_explicit_values_config_and_a_launcher_are_not_timed(tmp_path, monkeypatch):
    timer = FakeTimer({"no": 1.0, "bf16": 0.1})
    for value in ("no", "bf16", "fp16"):
        assert (resolve(timer, tmp_path, setting=value).precision, timer.calls) == (value, 0)
    for value in ("config", None):  # accelerate's config decides, as an unset value always did
        choice = resolve(timer, tmp_path, setting=value)
        assert (choice.precision, choice.how) == (None, "config")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch` sets for its processes
    choice = resolve(timer, tmp_path)
    assert (choice.precision, choice.how, timer.calls) == (None, "launcher", 0)
    assert "launcher's precision (bf16)" in describe(choice, "tiny")


def test_real_timing_of_two_candidates_fills_the_cache(tmp_path):
    choice = resolve_mixed_precision("auto", CPU, PROBE, 2, 16, choices=["no", "bf16"], cache_dir=tmp_path,
                                     budget_s=10)
    assert choice.how == "measured" and choice.precision in ("no", "bf16")
    assert set(choice.seconds_per_step) == {"no", "bf16"} and all(s > 0 for s in choice.seconds_per_step.values())
    assert choice.precision == choose(choice.seconds_per_step)
    (entry,) = tmp_path.glob("mixed_precision-*.json")
    record = json.loads(entry.read_text())
    assert record["choice"] == choice.precision and record["identity"]["batch"] == 2
    assert record["identity"]["model"]["config"]["block_out_channels"] == [32, 64]


def test_the_timing_loop_keeps_to_its_budget_and_alternates_variants():
    variants = [Variant("no"), Variant("bf16", channels_last=False)]
    times = time_variants(PROBE, variants, 2, 16, CPU, budget_s=None, rounds=2, steps_per_round=2)
    assert times.rounds == 2 and [len(times.steps[v.name]) for v in variants] == [4, 4]
    assert set(times.median()) == {"fp32", "bf16-nchw"}
    tight = time_variants(PROBE, variants, 2, 16, CPU, budget_s=0.0)  # only the warm-up of the first variant
    assert tight.rounds == 0 and tight.median() is None


def test_variant_names_round_trip():
    for name in ("fp32", "bf16-nchw", "fp16+compile", "bf16-nchw+compile"):
        assert Variant.parse(name).name == name
    with pytest.raises(ValueError):
        Variant.parse("int8")


def test_a_sweep_runs_every_trial_in_one_precision(tmp_path):
    trials = plan_trials({"model_preset": "tiny", "resolution": 16}, {"train_batch_size": ["2", "4"]}, 2, tmp_path)
    assert {t.cfg.speed.mixed_precision for t in trials} == {"config"}  # a timed choice could differ per trial
    pinned = plan_trials({"model_preset": "tiny", "mixed_precision": "bf16"}, {"train_batch_size": ["2"]}, 2, tmp_path)
    assert pinned[0].cfg.speed.mixed_precision == "bf16"


def test_auto_is_the_default_and_train_records_what_ran(image_folder, tmp_path, caplog):
    assert build_config({}, {}).speed.mixed_precision == "auto"
    out = tmp_path / "run"
    with caplog.at_level("INFO", logger="flowers_ddpm"):
        assert main(["train", *tiny_train_args(image_folder, out, max_train_steps=2, mixed_precision="auto")]) == 0
    info = json.loads((out / "pipeline" / "training_info.json").read_text())["mixed_precision"]
    expected_how = "measured" if bf16_supported(CPU) else "only candidate"
    assert info["setting"] == "auto" and info["how"] in (expected_how, "cached") and info["used"] in ("no", "bf16")
    assert any(r.getMessage().startswith("mixed_precision auto -> ") for r in caplog.records)
    pinned = tmp_path / "pinned"
    assert main(["train", *tiny_train_args(image_folder, pinned, max_train_steps=2)]) == 0  # --mixed_precision no
    info = json.loads((pinned / "pipeline" / "training_info.json").read_text())["mixed_precision"]
    assert info == {"setting": "no", "used": "no", "how": "explicit"}


def test_a_batch_too_slow_for_the_budget_is_timed_smaller_and_scaled():
    seconds, timed_at = measure_candidates(PROBE, ["no", "bf16"], 256, 16, CPU, budget_s=8)
    assert 4 <= timed_at < 256  # a warm-up and two steps of each candidate at batch 256 do not fit in 8 s
    assert set(seconds) == {"no", "bf16"} and all(s > 0 for s in seconds.values())

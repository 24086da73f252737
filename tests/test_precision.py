"""`--mixed_precision auto` (issue 18): measured, cached, never a slower candidate, recorded in training_info.json;
explicit values and accelerate's config unchanged."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from flowers_ddpm.cli import main
from flowers_ddpm.config.loading import build_config
from flowers_ddpm.experiments.benchmark import model_probe
from flowers_ddpm.experiments.sweep import plan_trials
from flowers_ddpm.training.device import DEFAULT_THREADS, bf16_supported, choose_cpu_threads
from flowers_ddpm.training.precision import (
    COMPILE_MIN_RUN_S,
    Variant,
    candidates,
    choose,
    describe,
    measure_candidates,
    resolve_channels_last,
    resolve_compile,
    resolve_mixed_precision,
    time_variants,
)

from .conftest import tiny_train_args

CPU = torch.device("cpu")
PROBE = model_probe("tiny", 16)


class FakeTimer:
    """Stands in for timing real steps: given seconds per step for each candidate (for compile also the compile
    time), counts its calls."""

    def __init__(self, seconds: dict):
        self.seconds, self.calls = seconds, 0

    def __call__(self, names):
        self.calls += 1
        assert set(names) <= set(self.seconds)  # asked for exactly the candidates it knows
        return dict(self.seconds)


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


@pytest.mark.slow  # two training runs and a timed start-up probe
def test_auto_is_the_default_and_train_records_what_ran(image_folder, tmp_path, caplog):
    speed = build_config({}, {}).speed
    assert (speed.mixed_precision, speed.channels_last, speed.compile) == ("auto", None, None)
    out = tmp_path / "run"
    with caplog.at_level("INFO", logger="flowers_ddpm"):
        assert main(["train", *tiny_train_args(image_folder, out, max_train_steps=2, mixed_precision="auto",
                                               channels_last=None, compile=None)]) == 0
    info = json.loads((out / "pipeline" / "training_info.json").read_text())
    expected_how = "measured" if bf16_supported(CPU) else "only candidate"
    precision, layout, compiled = info["mixed_precision"], info["channels_last"], info["compile"]
    assert precision["setting"] == "auto" and precision["how"] in (expected_how, "cached")
    assert precision["used"] in ("no", "bf16")
    assert layout["setting"] == "auto" and layout["how"] in ("measured", "cached")
    assert set(layout["figures"]) == {"channels_last_s", "nchw_s"} and isinstance(layout["used"], bool)
    # two tiny steps are far from paying for a compilation: not compiled, and compilation not timed
    assert (compiled["setting"], compiled["used"], compiled["how"]) == ("auto", False, "run too short")
    assert compiled["figures"]["steps"] == 2
    messages = [r.getMessage() for r in caplog.records]
    for start in ("mixed_precision auto -> ", "channels_last auto -> ", "compile auto -> False (run too short"):
        assert any(m.startswith(start) for m in messages), start
    config = yaml.safe_load((out / "pipeline" / "training_config.yaml").read_text())
    assert (config["channels_last"], config["compile"]) == (layout["used"], False)  # what ran
    pinned = tmp_path / "pinned"
    assert main(["train", *tiny_train_args(image_folder, pinned, max_train_steps=2)]) == 0  # --mixed_precision no
    info = json.loads((pinned / "pipeline" / "training_info.json").read_text())
    assert info["mixed_precision"] == {"setting": "no", "used": "no", "how": "explicit"}
    assert info["channels_last"] == {"setting": True, "used": True, "how": "explicit"}
    assert info["compile"] == {"setting": False, "used": False, "how": "explicit"}
    assert info["cpu_threads"]["setting"] == "auto" and 1 <= info["cpu_threads"]["used"] <= DEFAULT_THREADS


@pytest.mark.parametrize("requested, others_load, expected", [
    (None, 0.0, (2, "default")),  # an idle 2-core machine: PyTorch's default
    (None, 0.4, (2, "default")),  # a little background work: still both cores
    (None, 1.0, (1, "other")),  # one busy process: the thread that would share its core is dropped
    (None, 5.0, (1, "other")),  # never fewer than one
    (2, 5.0, (2, "explicit")),  # a value given is used as given
])
def test_cpu_threads_leave_the_cores_other_processes_keep_busy(requested, others_load, expected):
    threads, how = choose_cpu_threads(requested, cores=2, others_load=others_load, default=2)
    assert (threads, how.split()[0]) == expected


@pytest.mark.parametrize("seconds, expected", [
    ({"channels_last_s": 1.0, "nchw_s": 2.0}, True),  # NCHW slower: channels-last
    ({"channels_last_s": 1.0, "nchw_s": 0.9}, False),  # NCHW 11% faster: chosen
    ({"channels_last_s": 1.0, "nchw_s": 0.98}, True),  # 2% is not a clear margin: the default
    ({"channels_last_s": 0.5, "nchw_s": 1.0}, True),
])
def test_auto_layout_never_picks_a_slower_layout(seconds, expected, tmp_path):
    timer = FakeTimer(seconds)
    choice = resolve_channels_last(None, CPU, PROBE, 4, 16, "no", timer=timer, cache_dir=tmp_path)
    assert (choice.value, choice.how, timer.calls) == (expected, "measured", 1)
    assert choice.record()["figures"] == seconds
    again = resolve_channels_last(None, CPU, PROBE, 4, 16, "no", timer=FakeTimer({}), cache_dir=tmp_path)
    assert (again.value, again.how) == (expected, "cached")
    other_precision = FakeTimer(seconds)  # a bf16 run is another entry
    assert resolve_channels_last(None, CPU, PROBE, 4, 16, "bf16", timer=other_precision, cache_dir=tmp_path).how \
        == "measured" and other_precision.calls == 1


def test_explicit_layout_accelerates_precision_and_a_launcher_are_not_timed(tmp_path, monkeypatch):
    timer = FakeTimer({"channels_last_s": 1.0, "nchw_s": 0.1, "eager_s": 1.0, "compiled_s": 0.1, "compile_s": 0.0})
    for value in (True, False):
        choice = resolve_channels_last(value, CPU, PROBE, 4, 16, "no", timer=timer, cache_dir=tmp_path)
        assert (choice.value, choice.how) == (value, "explicit")
    choice = resolve_channels_last(None, CPU, PROBE, 4, 16, None, timer=timer, cache_dir=tmp_path)
    assert (choice.value, choice.how, timer.calls) == (True, "default", 0)
    monkeypatch.setenv("WORLD_SIZE", "2")  # several processes: each would time and could choose differently
    assert resolve_channels_last(None, CPU, PROBE, 4, 16, "bf16", timer=timer).how == "launcher"
    choice = resolve_compile(None, CPU, PROBE, 4, 16, "bf16", True, 10**9, eager_seconds=1.0, timer=timer)
    assert (choice.value, choice.how, timer.calls) == (False, "launcher", 0)


@pytest.mark.parametrize("figures, steps, expected", [
    ({"eager_s": 1.0, "compiled_s": 1.5, "compile_s": 10.0}, 10**6, False),  # compiled slower: never chosen
    ({"eager_s": 1.0, "compiled_s": 0.8, "compile_s": 60.0}, 10**4, True),  # saves 2000 s for 60 s of compiling
    ({"eager_s": 1.0, "compiled_s": 0.99, "compile_s": 60.0}, 4000, False),  # saves 40 s: not paid back twice
])
def test_auto_compile_only_when_the_measured_saving_pays_for_the_compilation(figures, steps, expected, tmp_path):
    timer = FakeTimer(figures)
    choice = resolve_compile(None, CPU, PROBE, 4, 16, "no", True, steps, eager_seconds=1.0, timer=timer,
                             cache_dir=tmp_path)
    assert (choice.value, choice.how, timer.calls) == (expected, "measured", 1)
    assert choice.figures["projected_saving_s"] == pytest.approx(steps * (figures["eager_s"] - figures["compiled_s"]))
    # the figures are cached; the decision is made again for the run's own length
    short = resolve_compile(None, CPU, PROBE, 4, 16, "no", True, 4000, eager_seconds=1.0, timer=FakeTimer({}),
                            cache_dir=tmp_path)
    assert short.how == "cached" and short.value == (4000 * (figures["eager_s"] - figures["compiled_s"])
                                                     >= 2 * figures["compile_s"])


def test_compile_is_not_timed_for_short_runs_or_when_set(tmp_path):
    timer = FakeTimer({"eager_s": 1.0, "compiled_s": 0.1, "compile_s": 0.0})
    steps = int(COMPILE_MIN_RUN_S / 0.5) - 1  # just under the length worth timing at 0.5 s per eager step
    choice = resolve_compile(None, CPU, PROBE, 4, 16, "no", True, steps, eager_seconds=0.5, timer=timer,
                             cache_dir=tmp_path)
    assert (choice.value, choice.how, timer.calls) == (False, "run too short", 0)
    assert "compile auto -> False (run too short" in choice.describe("tiny")
    for value in (True, False):
        assert resolve_compile(value, CPU, PROBE, 4, 16, "no", True, 10**9, timer=timer).how == "explicit"
    assert resolve_compile(None, CPU, PROBE, 4, 16, None, True, 10**9, timer=timer).how == "default"
    assert timer.calls == 0 and not list(tmp_path.iterdir())


def test_a_batch_too_slow_for_the_budget_is_timed_smaller_and_scaled():
    seconds, timed_at = measure_candidates(PROBE, ["no", "bf16"], 256, 16, CPU, budget_s=8)
    assert 4 <= timed_at < 256  # a warm-up and two steps of each candidate at batch 256 do not fit in 8 s
    assert set(seconds) == {"no", "bf16"} and all(s > 0 for s in seconds.values())

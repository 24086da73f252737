"""The Trainer loop's contract, without a UNet, noise or images: a fake objective (the mean squared error of a
2 -> 1 linear model), a fake resumable stream (batch n is a fixed function of n) and a fake publisher, driven by
a real CPU `accelerate.Accelerator`, a real AdamW, LR schedule and EMA, and the real checkpoint files."""

from __future__ import annotations

import copy
import json
import shutil
import signal

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState, PartialState
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file

from flowers_ddpm.training import checkpointing
from flowers_ddpm.training.stopping import EXIT_NONFINITE, EXIT_PREEMPTED, NonFiniteLoss, Preempted
from flowers_ddpm.training.trainer import LoopSettings, Trainer

BATCH = 3
TRUE_WEIGHTS = torch.tensor([[1.0, -2.0]])


class CountingStream:
    """A DataStream whose n-th batch (counted from 0) is a fixed function of n; its state is the number of batches
    handed out, so a restored stream continues with exactly the next batch. Batches listed in `nan_batches` hold a
    NaN, which makes the loss and the gradients non-finite."""

    def __init__(self, nan_batches=()):
        self.position = 0
        self.nan_batches = set(nan_batches)
        self.handed_out: list[int] = []  # batch numbers, in the order the trainer took them
        self.loaded: dict | None = None

    def __iter__(self):
        while True:
            n = self.position
            self.position += 1
            self.handed_out.append(n)
            yield self.batch(n)

    def batch(self, n: int) -> dict:
        x = torch.sin(torch.arange(2 * BATCH, dtype=torch.float32).reshape(BATCH, 2) + n)
        if n in self.nan_batches:
            x[0, 0] = float("nan")
        return {"pixel_values": x, "target": x @ TRUE_WEIGHTS.T + 0.5, "ids": [f"{n}-{i}" for i in range(BATCH)]}

    def state_dict(self) -> dict:
        return {"position": self.position, "world_size": 1}  # the real stream also records the world size

    def load_state_dict(self, state: dict) -> None:
        self.loaded = state
        self.position = state["position"]


def mse_objective(model, batch: dict) -> torch.Tensor:
    """The objective turns (model, batch) into a loss; the trainer knows nothing else about it."""
    return torch.nn.functional.mse_loss(model(batch["pixel_values"]), batch["target"])


class RecordingPublisher:
    """Records the steps it was called at and the weights it was handed."""

    def __init__(self):
        self.grids: list[int] = []
        self.exports: list[int] = []
        self.exported_weights: dict[int, dict] = {}
        self.exported_seconds: dict[int, float] = {}

    def sample_grid(self, model, step: int):
        self.grids.append(step)
        return None

    def export(self, model, step: int, training_seconds: float) -> None:
        self.exports.append(step)
        self.exported_seconds[step] = training_seconds
        self.exported_weights[step] = copy.deepcopy(model.state_dict())


def reset_accelerate() -> None:
    """accelerate's process-wide singletons: a fresh state for each Accelerator built in one test."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def make_trainer(output_dir, accumulation: int = 2, stream: CountingStream | None = None, **settings):
    reset_accelerate()
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulation)
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    lr_scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=0.1, total_iters=10)
    ema = EMAModel(model.parameters(), decay=0.9, use_ema_warmup=True, inv_gamma=1.0, power=0.75)
    model, optimizer = accelerator.prepare(model, optimizer)
    (output_dir / "report").mkdir(parents=True, exist_ok=True)  # the run set-up makes it; the trainer appends
    loop = LoopSettings(**{"max_train_steps": 6, "output_dir": str(output_dir), "logging_steps": 2,
                           "checkpointing_steps": 2, "save_images_steps": 3, "save_model_steps": 4, **settings})
    return Trainer(accelerator, model, mse_objective, optimizer, lr_scheduler, ema, stream or CountingStream(),
                   RecordingPublisher(), loop)


def saved_steps(output_dir) -> list[int]:
    return [step for step, _ in checkpointing.complete_checkpoints(output_dir)]


def test_runs_max_train_steps_and_saves_logs_and_publishes_when_due(tmp_path):
    trainer = make_trainer(tmp_path / "run")
    start = copy.deepcopy(trainer.model.state_dict())
    trainer.train()

    assert trainer.progress.global_step == 6
    assert trainer.batches.handed_out == list(range(12))  # 6 optimizer steps x 2 micro-batches, nothing more
    assert trainer.progress.images_seen == 6 * 2 * BATCH
    assert int(trainer.optimizer.state_dict()["state"][0]["step"]) == 6  # AdamW stepped once per optimizer step
    assert trainer.lr_scheduler.last_epoch == 6  # the LR schedule too
    assert not torch.equal(trainer.model.weight, start["weight"])
    assert trainer.publisher.grids == [3, 6]  # every save_images_steps and at the end
    assert trainer.publisher.exports == [4, 6]  # every save_model_steps and at the end
    assert saved_steps(tmp_path / "run") == [2, 4, 6]  # every checkpointing_steps (6 is also the end)
    logged = [json.loads(line) for line in (tmp_path / "run" / "report" / "loss.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in logged] == [2, 4, 6]

    # the publisher gets the EMA weights; the model keeps its own afterwards
    shadow = trainer.ema.shadow_params
    assert torch.equal(trainer.publisher.exported_weights[6]["weight"], shadow[0])
    assert torch.equal(trainer.publisher.exported_weights[6]["bias"], shadow[1])
    assert not torch.equal(trainer.model.weight.detach(), shadow[0])
    final = tmp_path / "run" / "checkpoints" / "checkpoint-6"
    checkpointing.verify_checkpoint(final)
    assert torch.equal(load_file(final / "ema.safetensors")["weight"], shadow[0])
    assert json.loads((final / "data_state_rank0.json").read_text()) == {"position": 12, "world_size": 1}


def test_resume_continues_at_the_saved_step_and_stream_position_and_ends_identical(tmp_path):
    straight = make_trainer(tmp_path / "straight")
    straight.train()

    resumed_dir = tmp_path / "resumed"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    saved = resumed_dir / "checkpoints" / "checkpoint-4"
    shutil.copytree(tmp_path / "straight" / "checkpoints" / "checkpoint-4", saved)
    resumed = make_trainer(resumed_dir)
    resumed.train(resume_from=saved)

    assert resumed.batches.loaded == {"position": 8, "world_size": 1}  # the stream position of step 4
    assert resumed.batches.handed_out == list(range(8, 12))  # the next batches, none read again
    assert resumed.progress.global_step == 6 and resumed.progress.images_seen == 6 * 2 * BATCH
    assert resumed.publisher.grids == [6] and resumed.publisher.exports == [6]
    assert saved_steps(resumed_dir) == [4, 6]
    a, b = tmp_path / "straight" / "checkpoints" / "checkpoint-6", resumed_dir / "checkpoints" / "checkpoint-6"
    for name in ("model.safetensors", "ema.safetensors"):
        weights_a, weights_b = load_file(a / name), load_file(b / name)
        assert weights_a.keys() == weights_b.keys() and all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert (a / "trainer_state.json").read_text() == (b / "trainer_state.json").read_text()  # step, LR, EMA decay
    opt_a, opt_b = straight.optimizer.state_dict()["state"][0], resumed.optimizer.state_dict()["state"][0]
    assert all(torch.equal(opt_a[k], opt_b[k]) for k in opt_a)


def test_training_time_adds_up_over_resumes_and_each_part_is_summarised(tmp_path):
    first = make_trainer(tmp_path / "run", max_train_steps=4)
    first.train()
    assert (first.summary.steps, first.summary.global_step, first.summary.images) == (4, 4, 4 * 2 * BATCH)
    assert first.summary.images_per_sec > 0 and first.summary.training_seconds >= first.summary.seconds
    saved = tmp_path / "run" / "checkpoints" / "checkpoint-4"
    before = json.loads((saved / "training_time.json").read_text())["training_seconds"]
    assert 0 < before <= first.summary.training_seconds

    resumed = make_trainer(tmp_path / "run")
    resumed.train(resume_from=saved)
    part = resumed.summary
    assert (part.steps, part.global_step, part.images) == (2, 6, 2 * 2 * BATCH)  # this part only
    # the model card's training time: the first part's plus this one's, not this part's alone
    assert before < resumed.publisher.exported_seconds[6] <= before + part.seconds
    assert part.training_seconds == pytest.approx(before + part.seconds, abs=0.05)
    assert json.loads((tmp_path / "run" / "checkpoints" / "checkpoint-6" / "training_time.json").read_text())[
        "training_seconds"] > before


def test_progress_bar_shows_loss_and_images_per_second(tmp_path):
    trainer = make_trainer(tmp_path / "run", max_train_steps=2)
    trainer.train()
    trainer.run_step(trainer.batches.batch(n) for n in (100, 101))
    shown = trainer.log(3)  # what the bar's postfix shows (TensorBoard gets the same values)
    assert set(shown) == {"loss", "img/s", "lr"} and float(shown["img/s"]) > 0 and float(shown["loss"]) > 0


def test_resuming_from_the_final_checkpoint_trains_nothing_and_exports_again(tmp_path):
    make_trainer(tmp_path / "run").train()
    again = make_trainer(tmp_path / "run")
    again.train(resume_from=tmp_path / "run" / "checkpoints" / "checkpoint-6")
    assert again.batches.handed_out == [] and again.progress.global_step == 6
    assert again.publisher.exports == [6] and again.publisher.grids == []


def test_consecutive_nonfinite_losses_are_skipped_then_stop_the_run(tmp_path, caplog):
    # one micro-batch per step: step s takes batch s - 1; steps 3, 5, 6 and 7 are non-finite, step 4 is not
    stream = CountingStream(nan_batches={2, 4, 5, 6})
    trainer = make_trainer(tmp_path / "nan", accumulation=1, stream=stream, max_train_steps=10, checkpointing_steps=1,
                           max_consecutive_nonfinite=3)
    with caplog.at_level("WARNING"), pytest.raises(NonFiniteLoss, match="stopped at step 7: 3 consecutive steps") as e:
        trainer.train()
    assert e.value.exit_code == EXIT_NONFINITE
    assert "step 3: non-finite loss or gradient; update skipped (1 in a row, 1 in total)" in caplog.text
    assert trainer.nonfinite_steps == 4 and trainer.consecutive_nonfinite == 3

    out = tmp_path / "nan"
    assert saved_steps(out) == [1, 2, 3, 4, 5, 6]  # nothing saved for the step that hit the limit
    weights = {s: load_file(out / "checkpoints" / f"checkpoint-{s}" / "model.safetensors") for s in range(1, 7)}
    emas = {s: load_file(out / "checkpoints" / f"checkpoint-{s}" / "ema.safetensors") for s in range(1, 7)}
    for saved in (weights, emas):
        assert torch.equal(saved[3]["weight"], saved[2]["weight"])  # step 3 skipped: no update, no EMA step
        assert not torch.equal(saved[4]["weight"], saved[3]["weight"])  # step 4 trained
        assert torch.equal(saved[6]["weight"], saved[4]["weight"])  # steps 5 and 6 skipped
    assert all(torch.isfinite(t).all() for t in weights[6].values())
    state = json.loads((out / "checkpoints" / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["nonfinite_steps"] == 3 and state["lr_scheduler"]["last_epoch"] == 6  # the schedule moved on


def test_sigterm_finishes_the_step_saves_it_and_stops(tmp_path):
    class SignalAtStep3(CountingStream):
        def batch(self, n):
            if n == 4:  # the first micro-batch of step 3
                signal.raise_signal(signal.SIGTERM)
            return super().batch(n)

    trainer = make_trainer(tmp_path / "run", stream=SignalAtStep3(), checkpointing_steps=100)
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Preempted, match="at step 3; checkpoint-3 saved") as e:
        trainer.train()
    assert e.value.exit_code == EXIT_PREEMPTED
    assert trainer.batches.handed_out == list(range(6))  # step 3 finished with both of its micro-batches
    assert saved_steps(tmp_path / "run") == [3]
    assert signal.getsignal(signal.SIGTERM) == handler  # the previous handler is back

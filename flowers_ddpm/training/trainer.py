"""The accelerate training loop. It knows about optimizers, EMA, logging and checkpoints, not about data or noise:
the objective turns (model, batch) into a loss, and a `Publisher` turns weights into sample grids and pipelines.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Protocol, Sequence

import torch
from tqdm.auto import tqdm

from .._util.distributed import together
from ..errors import StorageError, UserError, storage_fault
from ..publish import run_log
from . import checkpointing
from .stopping import NonFiniteLoss, NonFiniteWeights, Preempted, StopRequest

logger = logging.getLogger(__name__)
TRAINER_STATE_FILE = "trainer_state.json"
# wall-clock seconds of the run up to a checkpoint, over every resumed part; apart from trainer_state.json, which
# is the same for a resumed run as for an uninterrupted one
TRAINING_TIME_FILE = "training_time.json"
EMA_FILE = "ema.safetensors"
PHEMA_FILE = "phema.safetensors"  # post-hoc EMA profiles (training/phema.py)


class Publisher(Protocol):
    """What the trainer needs to turn weights into artefacts (implemented by the train command)."""

    def sample_grid(self, model, step: int) -> Optional["PIL.Image.Image"]: ...  # noqa: F821

    def export(self, model, step: int, training_seconds: float) -> None: ...  # seconds: over every resume


class Evaluator(Protocol):
    """Scores weights on every process and returns the values to log (implemented by the train command)."""

    def __call__(self, model, step: int) -> dict: ...


class DataStream(Protocol):
    def __iter__(self) -> Iterator[dict]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class TrainingProgress:
    """Counters saved with each checkpoint (in trainer_state.json)."""

    global_step: int = 0
    images_seen: int = 0

    def state_dict(self) -> dict:
        return {"global_step": self.global_step, "images_seen": self.images_seen}

    def load_state_dict(self, state: dict) -> None:
        self.global_step, self.images_seen = state["global_step"], state["images_seen"]


@dataclass
class SessionSummary:
    """What one call of `Trainer.train` did (the console summary at the end of a run)."""

    steps: int  # optimizer steps taken in this call (fewer than global_step after a resume)
    images: int
    seconds: float
    global_step: int
    training_seconds: float  # over every resumed part

    @property
    def images_per_sec(self) -> float:
        return self.images / max(self.seconds, 1e-9)


@dataclass
class LoopSettings:
    max_train_steps: int
    output_dir: str
    max_grad_norm: float = 1.0
    logging_steps: int = 10
    checkpointing_steps: int = 500
    checkpoints_total_limit: Optional[int] = None
    save_images_steps: int = 1000
    save_model_steps: Optional[int] = None
    log_data_order: bool = False
    eval_steps: Optional[int] = None
    max_consecutive_nonfinite: int = 10
    phema_snapshot_steps: int = 500
    run_settings: Optional[dict] = None  # the effective config, stored with each checkpoint for resume checks


class Trainer:
    """run_step = forward_backward per micro-batch + optimizer_step + update_ema; then log / save as due."""

    def __init__(self, accelerator, model, objective, optimizer, lr_scheduler, ema, batches: DataStream,
                 publisher: Publisher, settings: LoopSettings, evaluator: Optional[Evaluator] = None,
                 phema=None, extra_optimizers: Sequence = ()):
        self.accelerator, self.model, self.objective = accelerator, model, objective
        self.optimizer, self.lr_scheduler, self.ema = optimizer, lr_scheduler, ema
        self.batches, self.publisher, self.settings = batches, publisher, settings
        self.evaluator = evaluator
        self.phema = phema  # post-hoc EMA profiles (training/phema.py), or None
        # optimizers of training-only parts of the objective (learned loss weights), stepped with the model's
        self.extra_optimizers = list(extra_optimizers)
        self.progress = TrainingProgress()
        # lr schedule, counters and EMA are saved by us (JSON + safetensors), not register_for_checkpointing,
        # whose files are pickles that accelerate loads with weights_only=False
        self._loss_sum = torch.zeros((), device=accelerator.device)
        self._loss_count = 0
        self._last_log = (time.perf_counter(), 0)
        self._data_log = None
        self.nonfinite_steps = 0  # skipped updates, total and in a row
        self.consecutive_nonfinite = 0
        self.stop_request = StopRequest()
        self._session_start = (time.perf_counter(), 0, 0)  # (clock, global step, images seen) when train() began
        self._seconds_before = 0.0  # training time of the parts before a resume (from the checkpoint)
        self.summary: Optional[SessionSummary] = None  # set when train() returns

    # -- one optimizer step -------------------------------------------------------------------------------------
    def forward_backward(self, batch: dict) -> torch.Tensor:
        with self.accelerator.accumulate(self.model):
            loss = self.objective(self.model, batch)
            self.accelerator.backward(loss)
        return loss.detach()

    def clip_gradients(self) -> torch.Tensor:
        """Clip to max_grad_norm (when > 0) and return the total gradient norm (synchronised across processes)."""
        max_norm = self.settings.max_grad_norm if self.settings.max_grad_norm > 0 else float("inf")
        return self.accelerator.clip_grad_norm_(self.model.parameters(), max_norm)

    def agree_on_step(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> tuple[bool, bool]:
        """(finite, stop) for this step, identical on every process.

        One small all-reduce and one host sync per step: the update must be skipped on every process or none,
        and all processes must stop at the same step. With fp16 the GradScaler already skips overflowing
        gradients and lowers its scale, so only a non-finite loss counts there.
        """
        bad = ~torch.isfinite(loss)
        if self.accelerator.scaler is None:
            bad = bad | ~torch.isfinite(grad_norm)
        stop = torch.tensor(self.stop_request.received is not None, device=bad.device)
        flags = torch.stack([bad, stop]).float()
        if self.accelerator.num_processes > 1:
            flags = self.accelerator.reduce(flags, reduction="sum")
        bad_any, stop_any = (v > 0 for v in flags.tolist())
        return not bad_any, stop_any

    def optimizer_step(self, finite: bool) -> None:
        for optimizer in (self.optimizer, *self.extra_optimizers):
            if finite:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        self.lr_scheduler.step()  # once per optimizer step, whatever the number of processes

    def update_ema(self) -> None:
        if self.ema is not None:
            self.ema.step(self._unwrapped().parameters())
        if self.phema is not None:
            self.phema.update(self._unwrapped().parameters(), self.progress.global_step)

    def run_step(self, micro_batches: Iterable[dict]) -> bool:
        """One optimizer step; returns whether every process agreed to stop (a signal arrived) after it."""
        images, loss = 0, None
        for batch in micro_batches:
            micro_loss = self.forward_backward(batch)
            loss = micro_loss if loss is None else loss + micro_loss
            images += batch["pixel_values"].shape[0]
            self._record_data_order(batch)
        assert self.accelerator.sync_gradients, "micro-batch count must equal gradient_accumulation_steps"
        finite, stop = self.agree_on_step(loss, self.clip_gradients())
        self.optimizer_step(finite)
        self.progress.global_step += 1
        self.progress.images_seen += images * self.accelerator.num_processes
        if finite:
            self.update_ema()
            self._loss_sum += loss / self.accelerator.gradient_accumulation_steps
            self._loss_count += 1
            self.consecutive_nonfinite = 0
        else:
            self._skip_nonfinite()
        return stop

    def _skip_nonfinite(self) -> None:
        self.nonfinite_steps += 1
        self.consecutive_nonfinite += 1
        step, limit = self.progress.global_step, self.settings.max_consecutive_nonfinite
        logger.warning("step %d: non-finite loss or gradient; update skipped (%d in a row, %d in total)", step,
                       self.consecutive_nonfinite, self.nonfinite_steps)
        if self.consecutive_nonfinite >= limit:
            raise NonFiniteLoss(
                f"stopped at step {step}: {limit} consecutive steps had a non-finite loss or gradient; the last "
                f"checkpoint in {checkpointing.checkpoints_root(self.settings.output_dir)} is intact (lower the "
                "learning rate or check the data, then resume)"
            )

    # -- the loop -------------------------------------------------------------------------------------------------
    def train(self, resume_from: Optional[Path] = None) -> None:
        """Train until max_train_steps, resuming from a checkpoint when given.

        SIGTERM/SIGINT stop the run at the next step boundary (all processes at the same step) after saving a
        checkpoint, by raising `Preempted`; one that arrives while a step's checkpoint, sample grid or evaluation is
        being written stops the run before the next of those (a final checkpoint saved, the export left to the
        resume). One that arrives during the final export lets it finish: the run is then complete.
        """
        if resume_from is not None:
            self.load(resume_from)
        s, acc = self.settings, self.accelerator
        accumulation = acc.gradient_accumulation_steps
        batches = iter(self.batches)
        self._last_log = (time.perf_counter(), self.progress.images_seen)
        self._session_start = (time.perf_counter(), self.progress.global_step, self.progress.images_seen)
        if self.progress.global_step >= s.max_train_steps:
            # resumed from the final checkpoint: a run killed after saving it may have died before its export
            self.export(self.progress.global_step)
        with self.stop_request, tqdm(total=s.max_train_steps, initial=self.progress.global_step, desc="train",
                                     disable=not acc.is_local_main_process, dynamic_ncols=True) as bar:
            while self.progress.global_step < s.max_train_steps:
                stop = self.run_step(next(batches) for _ in range(accumulation))
                step = self.progress.global_step
                bar.update(1)
                if stop:
                    self.save(step)
                    raise Preempted(self._preempted_message(step))
                final = step == s.max_train_steps
                if step % s.logging_steps == 0 or final:
                    bar.set_postfix(self.log(step))
                if self.phema is not None and (step % s.phema_snapshot_steps == 0 or final):
                    with together(self.accelerator):
                        if self.accelerator.is_main_process:
                            self.phema.save_snapshot(s.output_dir, step)
                saved = step % s.checkpointing_steps == 0 or final
                if saved:
                    self.save(step)
                due = [(step % s.save_images_steps == 0 or final, self.sample),
                       (self.evaluator is not None and (step % s.eval_steps == 0 or final), self.evaluate),
                       ((s.save_model_steps and step % s.save_model_steps == 0) or final, self.export)]
                for _, action in filter(lambda pair: pair[0], due):
                    if self._stop_agreed():  # a signal during this step's save, sample grid or evaluation
                        if not saved:
                            self.save(step)
                        raise Preempted(self._preempted_message(step))
                    action(step)
        if self.stop_request.received is not None:
            logger.warning("received %s while the final pipeline was written; it was completed, and so is the run",
                           self.stop_request.received)
        if self._data_log:
            self._data_log.close()
        started, step0, images0 = self._session_start
        self.summary = SessionSummary(self.progress.global_step - step0, self.progress.images_seen - images0,
                                      time.perf_counter() - started, self.progress.global_step,
                                      self.training_seconds())

    def training_seconds(self) -> float:
        """Wall-clock seconds of the whole run so far: the resumed checkpoint's count plus this session's time."""
        return self._seconds_before + time.perf_counter() - self._session_start[0]

    def _stop_agreed(self) -> bool:
        """Whether a signal reached any process (one small all-reduce, so that all of them stop together)."""
        flag = torch.tensor(float(self.stop_request.received is not None), device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            flag = self.accelerator.reduce(flag, reduction="sum")
        return flag.item() > 0

    def _preempted_message(self, step: int) -> str:
        signal_name = self.stop_request.received or "a signal on another process"
        if step >= self.settings.max_train_steps:
            return (f"preempted by {signal_name} at step {step}; checkpoint-{step} saved (the last step), the "
                    "pipeline not exported yet: rerun with --resume_from_checkpoint latest to export it")
        return (f"preempted by {signal_name} at step {step}; checkpoint-{step} saved, rerun with "
                "--resume_from_checkpoint latest to continue")

    # -- logging, checkpoints, artefacts -----------------------------------------------------------------------
    def log(self, step: int) -> dict:
        acc = self.accelerator
        loss = acc.reduce(self._loss_sum / max(self._loss_count, 1), reduction="mean").item()
        self._loss_sum.zero_()
        self._loss_count = 0
        now, seen = time.perf_counter(), self.progress.images_seen
        then, seen_then = self._last_log
        self._last_log = (now, seen)
        values = {"loss": loss, "lr": self.lr_scheduler.get_last_lr()[0],
                  "images_per_sec": (seen - seen_then) / max(now - then, 1e-9)}
        if self.ema is not None:
            values["ema_decay"] = self.ema.cur_decay_value
        values["nonfinite_steps"] = self.nonfinite_steps
        acc.log(values, step=step)
        if acc.is_main_process:  # also kept in the run log, for the report's loss curve, sweeps and ablations
            run_log.append_record(self.settings.output_dir, {"step": step, **values})
        # the progress bar's postfix: what TensorBoard shows, also on the console
        return {"loss": f"{loss:.4f}", "img/s": f"{values['images_per_sec']:.1f}", "lr": f"{values['lr']:.2e}"}

    def check_weights_finite(self, step: int) -> None:
        """Raise NonFiniteWeights when a weight or EMA weight is NaN/Inf (on every process alike: the weights are
        the same on all of them). A finite loss and gradient can still give non-finite weights (an absurd learning
        rate); those are never checkpointed or exported."""
        params = list(self._unwrapped().parameters()) + (list(self.ema.shadow_params) if self.ema is not None else [])
        if torch.stack([torch.isfinite(p).all() for p in params]).all().item():
            return
        found = checkpointing.complete_checkpoints(self.settings.output_dir)
        if found:
            last = found[-1][1]
            advice = (f"the last good checkpoint is {last} (lower the learning rate and rerun with "
                      f"--resume_from_checkpoint {last})")
        else:
            advice = "no checkpoint was written before that (lower the learning rate and start again)"
        raise NonFiniteWeights(f"stopped at step {step}: the weights are not finite any more (NaN or Inf), so they "
                               f"were neither checkpointed nor exported; {advice}")

    def save(self, step: int) -> None:
        self.check_weights_finite(step)
        path = checkpointing.save_checkpoint(self.accelerator, self.settings.output_dir, step,
                                             self.batches.state_dict(), self._write_trainer_state,
                                             self.settings.run_settings, self.settings.checkpoints_total_limit)
        if self.accelerator.is_main_process:
            logger.info("saved checkpoint %s", path)

    def _write_trainer_state(self, folder: Path) -> None:
        """Counters, LR schedule and EMA settings as JSON; EMA weights as safetensors (keyed by parameter name)."""
        state = {"progress": self.progress.state_dict(), "lr_scheduler": self.lr_scheduler.state_dict(),
                 "nonfinite_steps": self.nonfinite_steps}
        if self.ema is not None:
            from safetensors.torch import save_file

            ema_state = self.ema.state_dict()
            shadow = ema_state.pop("shadow_params")
            names = [name for name, _ in self._unwrapped().named_parameters()]
            save_file({n: p.detach().contiguous().cpu() for n, p in zip(names, shadow)}, str(folder / EMA_FILE))
            state["ema"] = ema_state
        if self.phema is not None:
            from safetensors.torch import save_file

            save_file(self.phema.tensors(), str(folder / PHEMA_FILE))
        checkpointing.dump_json(state, folder / TRAINER_STATE_FILE)
        checkpointing.dump_json({"training_seconds": round(self.training_seconds(), 3)}, folder / TRAINING_TIME_FILE)

    def _read_trainer_state(self, folder: Path) -> None:
        state = checkpointing.load_json(folder / TRAINER_STATE_FILE)
        self.progress.load_state_dict(state["progress"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.nonfinite_steps = state.get("nonfinite_steps", 0)
        if (folder / TRAINING_TIME_FILE).is_file():  # checkpoints of older versions lack it
            self._seconds_before = checkpointing.load_json(folder / TRAINING_TIME_FILE)["training_seconds"]
        if self.ema is not None:
            from safetensors.torch import load_file

            weights = load_file(str(folder / EMA_FILE))
            names = [name for name, _ in self._unwrapped().named_parameters()]
            devices = [p.device for p in self.ema.shadow_params]
            self.ema.load_state_dict({**state["ema"], "shadow_params": [
                weights[n].to(d) for n, d in zip(names, devices)]})
        if self.phema is not None:
            from safetensors.torch import load_file

            if not (folder / PHEMA_FILE).is_file():
                raise UserError(f"checkpoint {folder} has no post-hoc EMA profiles; resume without --phema_sigma_rel")
            self.phema.load_tensors(load_file(str(folder / PHEMA_FILE)))

    def load(self, path: Path) -> None:
        data_state = checkpointing.load_checkpoint(self.accelerator, path)
        self._read_trainer_state(path)
        if data_state is None:
            logger.warning("checkpoint %s has no data position for %d processes; the data stream restarts",
                           path, self.accelerator.num_processes)
        else:
            self.batches.load_state_dict(data_state)
        logger.info("resumed from %s at step %d", path, self.progress.global_step)

    @contextlib.contextmanager
    def ema_weights(self):
        """Temporarily swap the EMA weights into the model."""
        if self.ema is None:
            yield
            return
        params = list(self._unwrapped().parameters())
        self.ema.store(params)
        self.ema.copy_to(params)
        try:
            yield
        finally:
            self.ema.restore(params)

    def sample(self, step: int) -> None:
        with together(self.accelerator):
            if self.accelerator.is_main_process:
                with self.ema_weights():
                    grid = self.publisher.sample_grid(self._unwrapped(), step)
                if grid is not None:
                    import numpy as np

                    for tracker in self.accelerator.trackers:
                        if tracker.name == "tensorboard":
                            tracker.log_images({"samples": np.asarray(grid)[None]}, step=step, dataformats="NHWC")

    def evaluate(self, step: int) -> None:
        with self.ema_weights():  # on every process: the evaluator generates and gathers across processes
            values = self.evaluator(self._unwrapped(), step)
        self.accelerator.log(values, step=step)

    def export(self, step: int) -> None:
        self.check_weights_finite(step)
        with together(self.accelerator):
            if self.accelerator.is_main_process:
                with self.ema_weights():
                    try:
                        self.publisher.export(self._unwrapped(), step, self.training_seconds())
                    except Exception as e:
                        folder = getattr(e, "filename", None) or self.settings.output_dir
                        fault = storage_fault(e, folder)
                        if fault is None:
                            raise
                        raise StorageError(
                            f"{fault} while exporting the pipeline at step {step} to {folder} (the partial export "
                            f"was removed); {checkpointing.kept_checkpoint(self.settings.output_dir)}; free space or "
                            "fix the permissions, then rerun with --resume_from_checkpoint latest to export it") from e

    def _unwrapped(self):
        return self.accelerator.unwrap_model(self.model)

    def _record_data_order(self, batch: dict) -> None:
        if not self.settings.log_data_order:
            return
        if self._data_log is None:
            folder = Path(self.settings.output_dir) / "data_order"
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"rank{self.accelerator.process_index}.jsonl"
            self._data_log = open(path, "a")
            if path.stat().st_size and not path.read_bytes().endswith(b"\n"):  # a killed run's last line
                self._data_log.write("\n")
        self._data_log.write(json.dumps({"step": self.progress.global_step + 1, "ids": batch.get("ids", [])}) + "\n")
        self._data_log.flush()

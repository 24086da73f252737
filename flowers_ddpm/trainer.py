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
from typing import Iterable, Iterator, Optional, Protocol

import torch
from tqdm.auto import tqdm

from . import checkpointing

logger = logging.getLogger(__name__)


class Publisher(Protocol):
    """What the trainer needs to turn weights into artefacts (implemented by the train command)."""

    def sample_grid(self, model, step: int) -> Optional["PIL.Image.Image"]: ...  # noqa: F821

    def export(self, model, step: int) -> None: ...


class DataStream(Protocol):
    def __iter__(self) -> Iterator[dict]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class TrainingProgress:
    """Counters saved with each checkpoint (registered with accelerate)."""

    global_step: int = 0
    images_seen: int = 0

    def state_dict(self) -> dict:
        return {"global_step": self.global_step, "images_seen": self.images_seen}

    def load_state_dict(self, state: dict) -> None:
        self.global_step, self.images_seen = state["global_step"], state["images_seen"]


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


class Trainer:
    """run_step = forward_backward per micro-batch + optimizer_step + update_ema; then log / save as due."""

    def __init__(self, accelerator, model, objective, optimizer, lr_scheduler, ema, batches: DataStream,
                 publisher: Publisher, settings: LoopSettings):
        self.accelerator, self.model, self.objective = accelerator, model, objective
        self.optimizer, self.lr_scheduler, self.ema = optimizer, lr_scheduler, ema
        self.batches, self.publisher, self.settings = batches, publisher, settings
        self.progress = TrainingProgress()
        for obj in (lr_scheduler, self.progress) + ((ema,) if ema is not None else ()):
            accelerator.register_for_checkpointing(obj)
        self._loss_sum = torch.zeros((), device=accelerator.device)
        self._loss_count = 0
        self._last_log = (time.perf_counter(), 0)
        self._data_log = None

    # -- one optimizer step -------------------------------------------------------------------------------------
    def forward_backward(self, batch: dict) -> None:
        with self.accelerator.accumulate(self.model):
            loss = self.objective(self.model, batch)
            self.accelerator.backward(loss)
        self._loss_sum += loss.detach()
        self._loss_count += 1

    def optimizer_step(self) -> None:
        if self.settings.max_grad_norm > 0:
            self.accelerator.clip_grad_norm_(self.model.parameters(), self.settings.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.lr_scheduler.step()  # once per optimizer step, whatever the number of processes

    def update_ema(self) -> None:
        if self.ema is not None:
            self.ema.step(self._unwrapped().parameters())

    def run_step(self, micro_batches: Iterable[dict]) -> None:
        images = 0
        for batch in micro_batches:
            self.forward_backward(batch)
            images += batch["pixel_values"].shape[0]
            self._record_data_order(batch)
        assert self.accelerator.sync_gradients, "micro-batch count must equal gradient_accumulation_steps"
        self.optimizer_step()
        self.update_ema()
        self.progress.global_step += 1
        self.progress.images_seen += images * self.accelerator.num_processes

    # -- the loop -------------------------------------------------------------------------------------------------
    def train(self, resume_from: Optional[Path] = None) -> None:
        """Train until max_train_steps, resuming from a checkpoint when given."""
        if resume_from is not None:
            self.load(resume_from)
        s, acc = self.settings, self.accelerator
        accumulation = acc.gradient_accumulation_steps
        batches = iter(self.batches)
        self._last_log = (time.perf_counter(), self.progress.images_seen)
        with tqdm(total=s.max_train_steps, initial=self.progress.global_step, desc="train",
                  disable=not acc.is_local_main_process, dynamic_ncols=True) as bar:
            while self.progress.global_step < s.max_train_steps:
                self.run_step(next(batches) for _ in range(accumulation))
                step = self.progress.global_step
                bar.update(1)
                if step % s.logging_steps == 0 or step == s.max_train_steps:
                    bar.set_postfix(self.log(step))
                if step % s.checkpointing_steps == 0 or step == s.max_train_steps:
                    self.save(step)
                if step % s.save_images_steps == 0 or step == s.max_train_steps:
                    self.sample(step)
                if (s.save_model_steps and step % s.save_model_steps == 0) or step == s.max_train_steps:
                    self.export(step)
        if self._data_log:
            self._data_log.close()

    # -- logging, checkpoints, artefacts -----------------------------------------------------------------------
    def log(self, step: int) -> dict:
        acc = self.accelerator
        loss = acc.reduce(self._loss_sum / max(self._loss_count, 1), reduction="mean").item()  # the only sync
        self._loss_sum.zero_()
        self._loss_count = 0
        now, seen = time.perf_counter(), self.progress.images_seen
        then, seen_then = self._last_log
        self._last_log = (now, seen)
        values = {"loss": loss, "lr": self.lr_scheduler.get_last_lr()[0],
                  "images_per_sec": (seen - seen_then) / max(now - then, 1e-9)}
        if self.ema is not None:
            values["ema_decay"] = self.ema.cur_decay_value
        acc.log(values, step=step)
        if acc.is_main_process:  # also kept as JSON lines for the report's loss curve (flowers_ddpm.report)
            with open(Path(self.settings.output_dir) / "report" / "loss.jsonl", "a") as f:
                f.write(json.dumps({"step": step, **values}) + "\n")
        return {"loss": f"{loss:.4f}", "lr": f"{values['lr']:.2e}"}

    def save(self, step: int) -> None:
        path = checkpointing.save_checkpoint(self.accelerator, self.settings.output_dir, step,
                                             self.batches.state_dict(), self.settings.checkpoints_total_limit)
        if self.accelerator.is_main_process:
            logger.info("saved checkpoint %s", path)

    def load(self, path: Path) -> None:
        data_state = checkpointing.load_checkpoint(self.accelerator, path)
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
        if self.accelerator.is_main_process:
            with self.ema_weights():
                grid = self.publisher.sample_grid(self._unwrapped(), step)
            if grid is not None:
                import numpy as np

                for tracker in self.accelerator.trackers:
                    if tracker.name == "tensorboard":
                        tracker.log_images({"samples": np.asarray(grid)[None]}, step=step, dataformats="NHWC")
        self.accelerator.wait_for_everyone()

    def export(self, step: int) -> None:
        if self.accelerator.is_main_process:
            with self.ema_weights():
                self.publisher.export(self._unwrapped(), step)
        self.accelerator.wait_for_everyone()

    def _unwrapped(self):
        return self.accelerator.unwrap_model(self.model)

    def _record_data_order(self, batch: dict) -> None:
        if not self.settings.log_data_order:
            return
        if self._data_log is None:
            folder = Path(self.settings.output_dir) / "data_order"
            folder.mkdir(parents=True, exist_ok=True)
            self._data_log = open(folder / f"rank{self.accelerator.process_index}.jsonl", "a")
        self._data_log.write(json.dumps({"step": self.progress.global_step + 1, "ids": batch.get("ids", [])}) + "\n")
        self._data_log.flush()

"""Evaluate a pipeline: generate on every process, extract features, gather them, compute the metrics, report.

Image i is drawn with generator seed + i (as in `flowers-ddpm sample`), and each process draws a contiguous block
of indices, so the images, and therefore the metrics, do not depend on the number of processes.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from .._util.distributed import gather_rows
from ..pipelines.conditioning import guidance_in_effect, guides_every_step
from ..pipelines.sampling import generate
from .metrics import compute_metrics


@dataclass
class SamplingSettings:
    num_images: int
    scheduler: Optional[str]
    steps: int
    seed: int = 0
    batch_size: int = 16
    class_labels: Optional[list[int]] = None  # class-conditional models: image i is of class_labels[i % len]
    guidance_scale: Optional[float] = None  # classifier-free guidance (None: the pipeline's default, 1)
    guidance_interval: Optional[list] = None  # [lo, hi] noise levels of that guidance (None: the pipeline's default)


def images_to_tensor(images) -> torch.Tensor:
    """PIL images -> uint8 (N, 3, H, W), the input every feature network takes."""
    return torch.from_numpy(np.stack([np.asarray(image.convert("RGB")) for image in images])).permute(0, 3, 1, 2)


def generated_features(accelerator, pipe, networks: dict, sampling: SamplingSettings) -> tuple[dict, float]:
    """Features of `num_images` generated images for each network, gathered on every process in image order,
    and the generation throughput (images/s over all processes, feature extraction excluded)."""
    indices = list(range(sampling.num_images))
    outputs: dict[str, dict[str, list]] = {name: {} for name in networks}
    seconds = 0.0
    with accelerator.split_between_processes(indices) as mine, \
            tqdm(total=len(mine), desc=f"generate {sampling.scheduler or 'default'}-{sampling.steps}", unit="img",
                 disable=not accelerator.is_local_main_process, leave=False) as bar:
        for start in range(0, len(mine), sampling.batch_size):
            block = mine[start:start + sampling.batch_size]
            began = time.perf_counter()
            images = generate(pipe, len(block), sampling.steps, sampling.seed + block[0], sampling.scheduler,
                              batch_size=len(block), class_labels=_block_labels(sampling.class_labels, block),
                              guidance_scale=sampling.guidance_scale, guidance_interval=sampling.guidance_interval)
            seconds += time.perf_counter() - began
            pixels = images_to_tensor(images).to(accelerator.device)
            for name, network in networks.items():
                for kind, value in network(pixels).items():
                    outputs[name].setdefault(kind, []).append(value.float().cpu())
            bar.update(len(block))
    slowest = gather_rows(accelerator, torch.tensor([seconds], dtype=torch.float64)).max().item()
    features = {name: {kind: gather_rows(accelerator, torch.cat(values)) for kind, values in kinds.items()}
                for name, kinds in outputs.items()}
    return features, sampling.num_images / max(slowest, 1e-9)


def _block_labels(class_labels: Optional[list[int]], block: list[int]) -> Optional[list[int]]:
    """The labels of the images in `block` (global indices), so labels cycle over all images, not per process."""
    if not class_labels:
        return None
    return [class_labels[i % len(class_labels)] for i in block]


def conditioning_record(pipe, labels: Optional[list[int]], guidance_scale: Optional[float],
                        guidance_interval: Optional[list] = None) -> Optional[dict]:
    """What metrics.json records about the labels the images were drawn with (None when unconditional): the
    guidance scale and interval in effect (the given ones, else the pipeline's saved ones), the interval only where
    there is one."""
    if labels is None:
        return None
    names = pipe.config.class_names
    scale, interval = guidance_in_effect(pipe, guidance_scale, guidance_interval)
    record = {"class_labels": labels, "class_names": [names[i] for i in labels] if names else None,
              "guidance_scale": scale}
    if not guides_every_step(interval):  # guidance at every step is recorded as before the interval existed
        record["guidance_interval"] = [float(v) for v in interval]
    return record


def evaluate_pipeline(accelerator, pipe, networks: dict, reference: dict, sampling: SamplingSettings,
                      with_precision_recall: bool = True) -> dict:
    """One row of results: sampler settings, throughput and every metric the given networks allow."""
    original = pipe.scheduler
    # "DDPM-1000" means the full chain: a model trained with fewer timesteps cannot take more sampler steps
    sampling = dataclasses.replace(sampling, steps=min(sampling.steps, original.config.num_train_timesteps))
    try:
        fake, images_per_sec = generated_features(accelerator, pipe, networks, sampling)
    finally:
        pipe.scheduler = original  # the next comparison starts from the pipeline's own scheduler config
    row = {"scheduler": sampling.scheduler or type(original).__name__, "steps": sampling.steps,
           "num_images": sampling.num_images, "images_per_sec": images_per_sec}
    dino = "dinov2" in networks
    row.update(compute_metrics(reference["inception"], fake["inception"],
                               real_dino=reference["dinov2"]["features"] if dino else None,
                               fake_dino=fake["dinov2"]["features"] if dino else None,
                               with_precision_recall=with_precision_recall))
    return row

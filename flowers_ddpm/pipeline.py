"""Exporting trained UNets as diffusers pipelines, and sampling from any pipeline folder or Hub id.

Nothing here imports the trainer: sampling works on pipelines made elsewhere too.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Optional

import torch
from PIL import Image

from .errors import UserError

TRAINING_CONFIG_NAME = "training_config.yaml"


def scheduler_classes() -> dict:
    """Sampler name -> diffusers scheduler class."""
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    return {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpmsolver++": DPMSolverMultistepScheduler}


def make_scheduler(name: str, config):
    """A sampler built from a training scheduler's config (same betas, prediction type and timestep count)."""
    classes = scheduler_classes()
    if name not in classes:
        raise UserError(f"scheduler must be one of {', '.join(classes)}; got {name!r}")
    if name == "dpmsolver++":
        return classes[name].from_config(config, algorithm_type="dpmsolver++")
    return classes[name].from_config(config)


def build_pipeline(unet, noise_scheduler):
    """The standard diffusers pipeline for an unconditional UNet."""
    from diffusers import DDPMPipeline

    return DDPMPipeline(unet=unet, scheduler=noise_scheduler)


def export_pipeline(unet, noise_scheduler, path: str | Path, training_config_yaml: Optional[str] = None) -> Path:
    """Write a `DiffusionPipeline.from_pretrained`-loadable folder (safetensors) atomically at `path`."""
    path = Path(path)
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    build_pipeline(unet, noise_scheduler).save_pretrained(str(tmp), safe_serialization=True)
    if training_config_yaml is not None:
        (tmp / TRAINING_CONFIG_NAME).write_text(training_config_yaml)
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)
    return path


def load_pipeline(model: str, device: torch.device, dtype: Optional[torch.dtype] = None):
    """Load any diffusers pipeline from a local folder or a Hub id, with one-line errors for the usual mistakes."""
    from diffusers import DiffusionPipeline

    local = Path(model)
    looks_local = local.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1
    if looks_local and not (local / "model_index.json").is_file():
        raise UserError(f"{model} is not a diffusers pipeline folder (no model_index.json)")
    try:
        pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=dtype)
    except OSError as e:  # huggingface_hub's not-found and connection errors are OSErrors
        raise UserError(f"cannot load pipeline {model}: {str(e).splitlines()[0]}") from None
    pipe.set_progress_bar_config(leave=False)
    return prepare_for_sampling(pipe.to(device))


def prepare_for_sampling(pipe):
    """Channels-last UNet weights, so convolutions run NHWC kernels. Only for pipelines that are used for sampling
    (safetensors cannot save channels-last weights; training keeps them contiguous)."""
    unet = getattr(pipe, "unet", None)
    if unet is not None:
        unet.to(memory_format=torch.channels_last)
    return pipe


@torch.inference_mode()
def generate(pipe, num_images: int, steps: int, seed: int, scheduler: Optional[str] = None,
             batch_size: int = 16) -> list[Image.Image]:
    """Generate images; image i uses its own generator seeded with seed + i, so batch size does not change them."""
    if scheduler:
        pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    images: list[Image.Image] = []
    for start in range(0, num_images, batch_size):
        count = min(batch_size, num_images - start)
        generators = [torch.Generator("cpu").manual_seed(seed + start + i) for i in range(count)]
        images += pipe(batch_size=count, generator=generators, num_inference_steps=steps, output_type="pil").images
    return images


def image_grid(images: list[Image.Image]) -> Image.Image:
    """A near-square grid (diffusers' make_image_grid), padding the last row with black tiles."""
    from diffusers.utils import make_image_grid

    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    padded = images + [Image.new("RGB", images[0].size)] * (rows * cols - len(images))
    return make_image_grid(padded, rows=rows, cols=cols)

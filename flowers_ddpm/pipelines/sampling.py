"""Exporting trained UNets as diffusers pipelines, and sampling from any pipeline folder or Hub id.

Nothing here imports the trainer: sampling works on pipelines made elsewhere too.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import os
from pathlib import Path
from typing import Optional

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EDMDPMSolverMultistepScheduler,
    EDMEulerScheduler,
    UNet2DModel,
)
from diffusers.utils import make_image_grid
from huggingface_hub import constants as hub_constants
from PIL import Image
from tqdm.auto import tqdm

from .._util.hub_ids import is_hub_id
from ..config.samplers import DEFAULT_SAMPLERS
from ..errors import UserError
from ..models.classifier import NoiseAwareClassifier
from .guided import GuidedDDPMPipeline, is_edm_scheduler


def scheduler_classes() -> dict:
    """Sampler name -> diffusers scheduler class, for DDPM-trained models."""
    return {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpmsolver++": DPMSolverMultistepScheduler,
            "sde-dpmsolver++": DPMSolverMultistepScheduler}


def edm_scheduler_classes() -> dict:
    """Sampler name -> diffusers scheduler class, for EDM-trained models (`--objective edm`)."""
    return {"edm-dpmsolver++": EDMDPMSolverMultistepScheduler, "edm-sde-dpmsolver++": EDMDPMSolverMultistepScheduler,
            "edm-euler": EDMEulerScheduler}


def is_edm_config(config) -> bool:
    """Whether a scheduler config belongs to an EDM scheduler (it has sigma_data; DDPM-family ones have betas)."""
    return "sigma_data" in config


def samplers_for(config) -> tuple[str, ...]:
    """The sampler names that can sample a model with this scheduler config: its family's (DDPM or EDM)."""
    return tuple(edm_scheduler_classes() if is_edm_config(config) else scheduler_classes())


def default_sampler(config) -> str:
    """The sampler used where none is chosen (`sample`, `evaluate`, the demo), by the model's family: the best
    measured in docs/sampling.md for DDPM-family models (their own scheduler is usually DDPM, which measured worst),
    EDM DPM-Solver++ (what EDM exports ship) for EDM-trained models, which no DDPM-family sampler can sample."""
    return DEFAULT_SAMPLERS["edm" if is_edm_config(config) else "ddpm"]


# a beta schedule only DDPMScheduler computes (DDIM and DPM-Solver take them as trained_betas)
OWN_BETA_SCHEDULES = ("sigmoid",)


def make_scheduler(name: str, config):
    """A sampler built from a training scheduler's config (same betas or sigmas, prediction type and timestep
    count). DDPM-family samplers refuse EDM-trained models and the EDM samplers refuse DDPM-trained ones.

    DPM-Solver++ has no `clip_sample`; where the config clips x0 (DDPM and DDIM do, to [-1, 1] by default) it gets
    the same clip through its thresholding with `sample_max_value` = `clip_sample_range` (for the range 1 the
    dynamic threshold is pinned at 1, a plain clip). Without it, the x0 predictions of a briefly trained
    epsilon-predicting model at large t, and their extrapolation by guidance, go unbounded (docs/sampling.md).
    """
    ddpm, edm = scheduler_classes(), edm_scheduler_classes()
    if name not in ddpm and name not in edm:
        raise UserError(f"scheduler must be one of {', '.join([*ddpm, *edm])}; got {name!r}")
    if is_edm_config(config) != (name in edm):
        kind, fits = ("an EDM-trained", edm) if is_edm_config(config) else ("a DDPM-trained", ddpm)
        raise UserError(f"scheduler {name} cannot sample {kind} model; use one of {', '.join(fits)}")
    if name in edm:  # only the settings the chosen EDM scheduler takes (the others would be warned about)
        accepted = inspect.signature(edm[name].__init__).parameters
        settings = {k: v for k, v in config.items() if k in accepted}
        if "algorithm_type" in accepted:  # EDM DPM-Solver++: deterministic or with fresh noise at each step
            settings["algorithm_type"] = name.removeprefix("edm-")
        return edm[name].from_config(settings)
    extra = {}
    if name in ("dpmsolver++", "sde-dpmsolver++"):  # the deterministic solver, or with fresh noise at each step
        extra["algorithm_type"] = name
        if name == "sde-dpmsolver++":  # the export's log-SNR steps are for the deterministic solver: with fresh
            extra["use_lu_lambdas"] = False  # noise they measured far worse (docs/sampling.md)
        if config.get("clip_sample") and not config.get("thresholding"):
            extra.update(thresholding=True, sample_max_value=config.get("clip_sample_range", 1.0))
    if config.get("beta_schedule") in OWN_BETA_SCHEDULES and config.get("trained_betas") is None and name != "ddpm":
        # DDIM and DPM-Solver do not compute these schedules themselves: hand them the training betas
        extra["trained_betas"] = DDPMScheduler.from_config(config).betas.tolist()
    return ddpm[name].from_config(config, **extra)


def check_sampler_steps(scheduler, steps: int) -> None:
    """A one-sentence error for step counts the sampler cannot take (diffusers would fail with an IndexError
    halfway through sampling: DPM-Solver++ needs fewer steps than the training timesteps)."""
    if is_edm_scheduler(scheduler):  # continuous noise levels: any positive step count
        if steps < 1:
            raise UserError(f"{steps} sampling steps: this sampler takes at least 1 step")
        return
    limit = scheduler.config.num_train_timesteps
    multistep = isinstance(scheduler, scheduler_classes()["dpmsolver++"])
    if steps < 1 or steps > limit or (multistep and steps >= limit):
        most = limit - 1 if multistep else limit
        raise UserError(f"{steps} sampling steps: this sampler takes 1 to {most} steps for a model trained with "
                        f"{limit} timesteps")


def _load_guided(model: str, dtype):
    """Build a GuidedDDPMPipeline from our own classes (no remote code is executed) and the folder's components;
    a saved classifier is loaded in float32, as classifier guidance differentiates it."""
    index = DiffusionPipeline.load_config(model)
    unet = UNet2DModel.from_pretrained(model, subfolder="unet", torch_dtype=dtype)
    scheduler_class = getattr(importlib.import_module("diffusers"), index["scheduler"][1])
    scheduler = scheduler_class.from_pretrained(model, subfolder="scheduler")
    classifier = None
    classifier_class = (index.get("classifier") or [None, None])[1]
    if classifier_class is not None:
        if classifier_class != NoiseAwareClassifier.__name__:
            raise UserError(f"{model} carries a classifier of unknown type {classifier_class}")
        classifier = NoiseAwareClassifier.from_pretrained(model, subfolder="classifier").eval().requires_grad_(False)
    defaults = {k: index[k] for k in ("guidance_scale", "classifier_scale", "guidance_interval") if k in index}
    return GuidedDDPMPipeline(unet=unet, scheduler=scheduler, classifier=classifier,
                              class_names=index.get("class_names"), **defaults)


def hub_offline() -> bool:
    """Whether the Hugging Face Hub is switched off (HF_HUB_OFFLINE), now or when huggingface_hub was imported."""
    return hub_constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def shipped_code(folder: Path, index: dict) -> list[Path]:
    """The .py files of a local pipeline folder that diffusers would import to load it: the pipeline class
    (`_class_name: [module, class]`) and components of a custom class (`unet: [module, class]` ->
    unet/<module>.py)."""
    candidates = []
    class_name = index.get("_class_name")
    if isinstance(class_name, list) and class_name and class_name[0]:
        candidates.append(folder / f"{class_name[0]}.py")
    for name, value in index.items():
        if not name.startswith("_") and isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
            candidates.append(folder / name / f"{value[0]}.py")
    return [path for path in candidates if path.is_file()]


def _refuse_code(model: str, files: list) -> UserError:
    named = ", ".join(str(f) for f in files) if files else "Python files"
    return UserError(f"{model} ships code that loading it would run ({named}); read it, and if you trust it pass "
                     "--trust_remote_code (flowers-ddpm sample) or load it with DiffusionPipeline.from_pretrained("
                     "..., trust_remote_code=True)")


def load_pipeline(model: str, device: torch.device, dtype: Optional[torch.dtype] = None,
                  trust_remote_code: bool = False):
    """Load any diffusers pipeline from a local folder or a Hub id, with one-line errors for the usual mistakes.
    A pipeline that ships its own code (a custom pipeline or component class) is refused unless
    `trust_remote_code`; our own GuidedDDPMPipeline folders are built from our classes and run none of theirs."""
    hub = is_hub_id(model)
    if not hub and not (Path(model) / "model_index.json").is_file():
        raise UserError(f"{model} is not a diffusers pipeline folder (no model_index.json)")
    try:
        index = DiffusionPipeline.load_config(model)
        class_name = index.get("_class_name")
        if isinstance(class_name, list) and class_name[1] == "GuidedDDPMPipeline":
            pipe = _load_guided(model, dtype)
        else:
            if not hub and not trust_remote_code and shipped_code(Path(model), index):
                raise _refuse_code(model, shipped_code(Path(model), index))
            pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=dtype, trust_remote_code=trust_remote_code)
    except OSError as e:  # huggingface_hub's not-found and connection errors are OSErrors
        if hub and hub_offline():
            raise UserError(f"cannot load pipeline {model}: the Hugging Face Hub is offline (HF_HUB_OFFLINE is set) "
                            f"and {model} is not in the local cache; unset HF_HUB_OFFLINE to download it, or pass a "
                            "local pipeline folder") from None
        raise UserError(f"cannot load pipeline {model}: {str(e).splitlines()[0]}") from None
    except ValueError as e:
        if "trust_remote_code" in str(e):  # a Hub repo that ships code (diffusers refuses it)
            raise _refuse_code(model, []) from None
        raise
    pipe.set_progress_bar_config(leave=False)
    return prepare_for_sampling(pipe.to(device))


def prepare_for_sampling(pipe):
    """Channels-last UNet weights on GPUs, so convolutions run NHWC kernels. Only for pipelines that are used for
    sampling (safetensors cannot save channels-last weights; training keeps them contiguous). Not on the CPU, where
    NHWC kernels gain little and make results depend on the batch size."""
    unet = getattr(pipe, "unet", None)
    if unet is not None and unet.device.type == "cuda":
        unet.to(memory_format=torch.channels_last)
    return pipe


def load_classifier(path: str, device: torch.device):
    """A noise-aware classifier folder written by `train-classifier` (float32, eval mode)."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise UserError(f"--classifier {path} is not a classifier folder (no config.json; pass the --output_dir "
                        "of train-classifier)")
    if json.loads(config_file.read_text()).get("_class_name") != NoiseAwareClassifier.__name__:
        raise UserError(f"--classifier {path} does not hold a noise-aware classifier (written by train-classifier)")
    return NoiseAwareClassifier.from_pretrained(path).to(device).eval().requires_grad_(False)


def with_classifier(pipe, classifier):
    """The pipeline as a GuidedDDPMPipeline (a plain DDPMPipeline is wrapped, sharing its UNet and scheduler),
    after checking that the classifier fits it: same resolution, noise schedule and classes."""
    config, unet = classifier.config, pipe.unet
    if config.sample_size != unet.config.sample_size:
        raise UserError(f"the classifier works at {config.sample_size} px but the model generates "
                        f"{unet.config.sample_size} px images")
    if is_edm_scheduler(pipe.scheduler):
        raise UserError("classifier guidance needs a DDPM-trained model; this one samples with an EDM scheduler")
    schedule = {k: pipe.scheduler.config.get(k) for k in (config.noise_schedule or {})}
    if schedule != (config.noise_schedule or {}):
        raise UserError(f"the classifier was trained on the noise schedule {config.noise_schedule} but the model "
                        f"uses {schedule}; train the classifier with the model's --ddpm_num_steps and "
                        "--ddpm_beta_schedule")
    num_classes = getattr(pipe, "num_classes", None)
    if num_classes is not None and num_classes != config.num_classes:
        raise UserError(f"the classifier knows {config.num_classes} classes but the model was trained on "
                        f"{num_classes}")
    if isinstance(pipe, GuidedDDPMPipeline):
        return pipe
    guided = GuidedDDPMPipeline(unet=unet, scheduler=pipe.scheduler)
    guided.set_progress_bar_config(leave=False)
    return guided


def generate(pipe, num_images: int, steps: int, seed: int, scheduler: Optional[str] = None,
             batch_size: int = 16, class_labels: Optional[list[int]] = None,
             guidance_scale: Optional[float] = None, classifier=None,
             classifier_scale: Optional[float] = None, progress: bool = False,
             guidance_interval: Optional[tuple[float, float]] = None) -> list[Image.Image]:
    """Generate images; image i uses its own generator seeded with seed + i, so batch size does not change them.

    With `class_labels` image i is of class `class_labels[i % len(class_labels)]` (class-conditional pipelines, or
    any GuidedDDPMPipeline with a noise-aware `classifier` or a saved one, which guides with `classifier_scale`).
    Scales (and `guidance_interval`, GuidedDDPMPipeline's noise levels lo, hi of classifier-free guidance) left
    out (None) take the pipeline's defaults. The pipeline's own progress bar (one per batch) is off;
    `progress` shows one bar over all images instead.
    """
    if scheduler:
        pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    check_sampler_steps(pipe.scheduler, steps)
    images: list[Image.Image] = []
    # classifier guidance differentiates the classifier, which inference_mode tensors do not allow
    guided = classifier is not None or getattr(pipe, "classifier", None) is not None
    bar_config = dict(getattr(pipe, "_progress_bar_config", {}))  # the caller's settings, restored at the end
    pipe.set_progress_bar_config(disable=True)
    try:
        with torch.no_grad() if guided else torch.inference_mode(), \
                tqdm(total=num_images, desc="sample", unit="img", disable=not progress, dynamic_ncols=True) as bar:
            for start in range(0, num_images, batch_size):
                count = min(batch_size, num_images - start)
                images += _generate_batch(pipe, start, count, steps, seed, class_labels, guidance_scale, classifier,
                                          classifier_scale, guidance_interval)
                bar.update(count)
    finally:
        pipe.set_progress_bar_config(**bar_config)
    return images


def _generate_batch(pipe, start: int, count: int, steps: int, seed: int, class_labels, guidance_scale, classifier,
                    classifier_scale, guidance_interval=None) -> list[Image.Image]:
    """Images start .. start + count - 1 of `generate`."""
    generators = [torch.Generator("cpu").manual_seed(seed + start + i) for i in range(count)]
    extra = {} if guidance_scale is None else {"guidance_scale": guidance_scale}
    if classifier is not None:
        extra["classifier"] = classifier
    if classifier_scale is not None:
        extra["classifier_scale"] = classifier_scale
    if guidance_interval is not None:
        extra["guidance_interval"] = guidance_interval
    if class_labels:
        extra["class_labels"] = [class_labels[(start + i) % len(class_labels)] for i in range(count)]
    return pipe(batch_size=count, generator=generators, num_inference_steps=steps, output_type="pil", **extra).images


def image_grid(images: list[Image.Image]) -> Image.Image:
    """A near-square grid (diffusers' make_image_grid): full rows where a column count up to twice the square's
    divides the images (10 images: 5 x 2), else the square's columns with the last row padded by black tiles."""
    square = math.ceil(math.sqrt(len(images)))
    cols = next((c for c in range(square, min(len(images), 2 * square) + 1) if len(images) % c == 0), square)
    rows = math.ceil(len(images) / cols)
    padded = images + [Image.new("RGB", images[0].size)] * (rows * cols - len(images))
    return make_image_grid(padded, rows=rows, cols=cols)

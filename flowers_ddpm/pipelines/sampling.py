"""Exporting trained UNets as diffusers pipelines, and sampling from any pipeline folder or Hub id.

Nothing here imports the trainer: sampling works on pipelines made elsewhere too.
"""

from __future__ import annotations

import importlib
import json
import math
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch
from PIL import Image

from ..errors import UserError

TRAINING_CONFIG_NAME = "training_config.yaml"


def scheduler_classes() -> dict:
    """Sampler name -> diffusers scheduler class."""
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    return {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpmsolver++": DPMSolverMultistepScheduler}


def make_scheduler(name: str, config):
    """A sampler built from a training scheduler's config (same betas, prediction type and timestep count).

    DPM-Solver++ has no `clip_sample`; where the config clips x0 (DDPM and DDIM do, to [-1, 1] by default) it gets
    the same clip through its thresholding with `sample_max_value` = `clip_sample_range` (for the range 1 the
    dynamic threshold is pinned at 1, a plain clip). Without it, the x0 predictions of a briefly trained
    epsilon-predicting model at large t, and their extrapolation by guidance, go unbounded (docs/sampling.md).
    """
    classes = scheduler_classes()
    if name not in classes:
        raise UserError(f"scheduler must be one of {', '.join(classes)}; got {name!r}")
    if name == "dpmsolver++":
        options = {"algorithm_type": "dpmsolver++"}
        if config.get("clip_sample") and not config.get("thresholding"):
            options.update(thresholding=True, sample_max_value=config.get("clip_sample_range", 1.0))
        return classes[name].from_config(config, **options)
    return classes[name].from_config(config)


def check_sampler_steps(scheduler, steps: int) -> None:
    """A one-sentence error for step counts the sampler cannot take (diffusers would fail with an IndexError
    halfway through sampling: DPM-Solver++ needs fewer steps than the training timesteps)."""
    limit = scheduler.config.num_train_timesteps
    multistep = isinstance(scheduler, scheduler_classes()["dpmsolver++"])
    if steps < 1 or steps > limit or (multistep and steps >= limit):
        most = limit - 1 if multistep else limit
        raise UserError(f"{steps} sampling steps: this sampler takes 1 to {most} steps for a model trained with "
                        f"{limit} timesteps")


GUIDED_PIPELINE_MODULE = "guided_ddpm_pipeline"  # the file name of guided_pipeline.py inside exported folders


def needs_guided_pipeline(unet) -> bool:
    """Class-conditional or learned-variance UNets need GuidedDDPMPipeline; the rest are plain DDPMPipelines."""
    return unet.config.num_class_embeds is not None or unet.config.out_channels != unet.config.in_channels


def build_pipeline(unet, noise_scheduler, class_names: Optional[list] = None):
    """A plain diffusers DDPMPipeline for an unconditional UNet, a GuidedDDPMPipeline otherwise."""
    from diffusers import DDPMPipeline

    if needs_guided_pipeline(unet):
        from .guided import GuidedDDPMPipeline

        return GuidedDDPMPipeline(unet=unet, scheduler=noise_scheduler, class_names=class_names)
    return DDPMPipeline(unet=unet, scheduler=noise_scheduler)


CLASSIFIER_MODULE = "classifier"  # the file name of classifier.py inside a pipeline folder's classifier/ folder


def _ship_pipeline_code(folder: Path, pipe) -> None:
    """Make a GuidedDDPMPipeline folder loadable by plain diffusers: copy the class's source file into it and name
    it in model_index.json, diffusers' convention for custom pipelines (loaded with trust_remote_code=True). A
    saved classifier ships its source as `classifier/classifier.py`, diffusers' convention for custom components
    (`get_class_obj_and_candidates` loads `<component>/<library>.py` of a ["<library>", "<class>"] entry)."""
    from ..models import classifier
    from . import guided

    shutil.copyfile(guided.__file__, folder / f"{GUIDED_PIPELINE_MODULE}.py")
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    index["_class_name"] = [GUIDED_PIPELINE_MODULE, "GuidedDDPMPipeline"]
    if getattr(pipe, "classifier", None) is not None:
        shutil.copyfile(classifier.__file__, folder / "classifier" / f"{CLASSIFIER_MODULE}.py")
        index["classifier"] = [CLASSIFIER_MODULE, type(pipe.classifier).__name__]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def save_pipeline(pipe, path: str | Path, write_extra: Optional[Callable[[Path], None]] = None) -> Path:
    """Write `pipe` as a `DiffusionPipeline.from_pretrained`-loadable folder (safetensors) atomically at `path`,
    with the code of a GuidedDDPMPipeline and its classifier; `write_extra(folder)` adds more files before the
    folder is moved into place."""
    from .guided import GuidedDDPMPipeline

    path = Path(path)
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(str(tmp), safe_serialization=True)
    if isinstance(pipe, GuidedDDPMPipeline):
        _ship_pipeline_code(tmp, pipe)
    if write_extra is not None:
        write_extra(tmp)
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)
    return path


def export_pipeline(unet, noise_scheduler, path: str | Path, training_config_yaml: Optional[str] = None,
                    class_names: Optional[list] = None, write_extra: Optional[Callable[[Path], None]] = None) -> Path:
    """Export a trained UNet and its noise scheduler as a pipeline folder at `path` (see `save_pipeline`)."""

    def extras(folder: Path) -> None:
        if training_config_yaml is not None:
            (folder / TRAINING_CONFIG_NAME).write_text(training_config_yaml)
        if write_extra is not None:
            write_extra(folder)

    return save_pipeline(build_pipeline(unet, noise_scheduler, class_names), path, extras)


def _load_guided(model: str, dtype):
    """Build a GuidedDDPMPipeline from our own classes (no remote code is executed) and the folder's components;
    a saved classifier is loaded in float32, as classifier guidance differentiates it."""
    from diffusers import DiffusionPipeline, UNet2DModel

    from ..models.classifier import NoiseAwareClassifier
    from .guided import GuidedDDPMPipeline

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
    defaults = {k: index[k] for k in ("guidance_scale", "classifier_scale") if k in index}
    return GuidedDDPMPipeline(unet=unet, scheduler=scheduler, classifier=classifier,
                              class_names=index.get("class_names"), **defaults)


def load_pipeline(model: str, device: torch.device, dtype: Optional[torch.dtype] = None):
    """Load any diffusers pipeline from a local folder or a Hub id, with one-line errors for the usual mistakes."""
    from diffusers import DiffusionPipeline

    local = Path(model)
    looks_local = local.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1
    if looks_local and not (local / "model_index.json").is_file():
        raise UserError(f"{model} is not a diffusers pipeline folder (no model_index.json)")
    try:
        class_name = DiffusionPipeline.load_config(model).get("_class_name")
        if isinstance(class_name, list) and class_name[1] == "GuidedDDPMPipeline":
            pipe = _load_guided(model, dtype)
        else:
            pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=dtype)
    except OSError as e:  # huggingface_hub's not-found and connection errors are OSErrors
        raise UserError(f"cannot load pipeline {model}: {str(e).splitlines()[0]}") from None
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


def resolve_class_labels(pipe, class_labels: Optional[list], classifier=None) -> Optional[list[int]]:
    """Class indices for labels given as indices or names (of the pipeline's classes, or of the guiding
    classifier's for an unconditional model); one-sentence errors for a wrong label or model."""
    if not class_labels:
        return None
    classifier = classifier if classifier is not None else getattr(pipe, "classifier", None)
    if getattr(pipe, "num_classes", None) is None and classifier is None:
        raise UserError("--class_labels needs a class-conditional pipeline or --classifier; this model is unconditional")
    try:
        return pipe.label_ids(class_labels, classifier)
    except ValueError as e:
        raise UserError(str(e)) from None


def load_classifier(path: str, device: torch.device):
    """A noise-aware classifier folder written by `train-classifier` (float32, eval mode)."""
    from ..models.classifier import NoiseAwareClassifier

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
    from .guided import GuidedDDPMPipeline

    config, unet = classifier.config, pipe.unet
    if config.sample_size != unet.config.sample_size:
        raise UserError(f"the classifier works at {config.sample_size} px but the model generates "
                        f"{unet.config.sample_size} px images")
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


def attach_classifier(model: str, classifier_dir: str, output: str | Path, classifier_scale: float = 1.0,
                      guidance_scale: float = 1.0) -> Path:
    """Write a GuidedDDPMPipeline folder at `output`: the pipeline `model` (conditional or not) with the classifier
    of `classifier_dir` as its saved `classifier` component and the given default guidance scales, loadable with
    only diffusers installed. The source's training config is kept."""
    device = torch.device("cpu")
    classifier = load_classifier(classifier_dir, device)
    pipe = with_classifier(load_pipeline(model, device), classifier)
    pipe.register_modules(classifier=classifier)
    pipe.register_to_config(classifier_scale=float(classifier_scale), guidance_scale=float(guidance_scale))
    source_config = Path(model) / TRAINING_CONFIG_NAME

    def copy_training_config(folder: Path) -> None:
        if source_config.is_file():
            shutil.copyfile(source_config, folder / TRAINING_CONFIG_NAME)

    return save_pipeline(pipe, output, copy_training_config)


def generate(pipe, num_images: int, steps: int, seed: int, scheduler: Optional[str] = None,
             batch_size: int = 16, class_labels: Optional[list[int]] = None,
             guidance_scale: Optional[float] = None, classifier=None,
             classifier_scale: Optional[float] = None) -> list[Image.Image]:
    """Generate images; image i uses its own generator seeded with seed + i, so batch size does not change them.

    With `class_labels` image i is of class `class_labels[i % len(class_labels)]` (class-conditional pipelines, or
    any GuidedDDPMPipeline with a noise-aware `classifier` or a saved one, which guides with `classifier_scale`).
    Scales left out (None) take the pipeline's defaults.
    """
    if scheduler:
        pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    check_sampler_steps(pipe.scheduler, steps)
    images: list[Image.Image] = []
    # classifier guidance differentiates the classifier, which inference_mode tensors do not allow
    guided = classifier is not None or getattr(pipe, "classifier", None) is not None
    with torch.no_grad() if guided else torch.inference_mode():
        for start in range(0, num_images, batch_size):
            count = min(batch_size, num_images - start)
            generators = [torch.Generator("cpu").manual_seed(seed + start + i) for i in range(count)]
            extra = {} if guidance_scale is None else {"guidance_scale": guidance_scale}
            if classifier is not None:
                extra["classifier"] = classifier
            if classifier_scale is not None:
                extra["classifier_scale"] = classifier_scale
            if class_labels:
                extra["class_labels"] = [class_labels[(start + i) % len(class_labels)] for i in range(count)]
            images += pipe(batch_size=count, generator=generators, num_inference_steps=steps, output_type="pil",
                           **extra).images
    return images


def image_grid(images: list[Image.Image]) -> Image.Image:
    """A near-square grid (diffusers' make_image_grid), padding the last row with black tiles."""
    from diffusers.utils import make_image_grid

    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    padded = images + [Image.new("RGB", images[0].size)] * (rows * cols - len(images))
    return make_image_grid(padded, rows=rows, cols=cols)

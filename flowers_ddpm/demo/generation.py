"""What one press of the demo's Generate button does, without any web framework: load a pipeline once, check the
request, draw the images through `sample`'s code path (same seed, same images as the CLI) and keep x_t of the first
image at a few steps for the denoising strip.

Reads only a pipeline folder or Hub id: nothing here imports the trainer.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Optional, Sequence

import torch
from PIL import Image

from ..errors import UserError
from ..pipelines.conditioning import (check_guidance_interval, guidance_in_effect, guides_every_step, interval_label,
                                      resolve_conditioning)
from ..pipelines.sampling import default_sampler, generate, image_grid, load_pipeline, samplers_for
from ..publish.report import labelled_row, strip_indices, tensor_to_image

MAX_IMAGES = 16
OWN_SAMPLER = "own"  # Request.sampler for the pipeline's own scheduler
STRIP_COLUMNS = 6
# guidance at every step, whatever interval the pipeline saved: its rule needs lo < hi, and every sigma is <= inf
EVERY_STEP = (0.0, math.inf)


@dataclasses.dataclass
class Request:
    """The page's controls. `sampler` None is the model's default sampler (the one `sample` uses without
    --scheduler), OWN_SAMPLER the pipeline's own scheduler; scales None are the pipeline's saved defaults; `classes`
    are names or indices, image i gets class i mod len(classes) (none: unconditional). `guidance_interval` (noise
    levels lo, hi of classifier-free guidance, as "LO HI" text or two numbers) None is the pipeline's saved
    interval, blank ("" or ()) guidance at every step; unconditional models ignore it."""

    num_images: int = 4
    seed: int = 0
    sampler: Optional[str] = None
    steps: int = 25
    classes: Sequence[str] = ()
    guidance_scale: Optional[float] = None
    classifier_scale: Optional[float] = None
    guidance_interval: str | Sequence[float] | None = None


@dataclasses.dataclass
class Result:
    images: list[Image.Image]
    grid: Image.Image
    strip: Image.Image  # x_t of the first image at a few steps, from pure noise to the image
    seconds: float
    summary: str


class DemoModel:
    """A pipeline loaded once (on the GPU in fp16 when there is one, as `sample` does) and what the page offers
    for it: class names, and guidance scales and interval where they apply."""

    def __init__(self, model: str, device: Optional[str] = None):
        self.model = model
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.pipe = load_pipeline(model, self.device, torch.float16 if self.device.type == "cuda" else None)
        self.pipe.set_progress_bar_config(disable=True)
        self._scheduler = self.pipe.scheduler  # each request starts from it, as each `sample` run does

    @property
    def classifier(self):
        return getattr(self.pipe, "classifier", None)

    @property
    def conditional(self) -> bool:
        """Whether the UNet takes class labels (classifier-free guidance applies)."""
        return getattr(self.pipe, "num_classes", None) is not None

    @property
    def class_names(self) -> Optional[list[str]]:
        """Names of the classes images can be drawn from (the UNet's, else the saved classifier's), indices as
        strings when none are saved; None when the model cannot draw a chosen class."""
        count = self.pipe.num_classes if self.conditional else getattr(getattr(self.classifier, "config", None),
                                                                       "num_classes", None)
        if count is None:
            return None
        names = self.pipe.config.get("class_names") or getattr(getattr(self.classifier, "config", None),
                                                               "class_names", None)
        return [str(name) for name in names] if names else [str(i) for i in range(count)]

    @property
    def default_guidance_scale(self) -> float:
        return float(self.pipe.config.get("guidance_scale", 1.0))

    @property
    def default_guidance_interval(self) -> Optional[list[float]]:
        """The noise levels [lo, hi] the pipeline saved for classifier-free guidance; None: every step."""
        interval = self.pipe.config.get("guidance_interval")
        return None if interval is None else [float(v) for v in interval]

    @property
    def default_classifier_scale(self) -> float:
        return float(self.pipe.config.get("classifier_scale", 1.0))

    @property
    def own_sampler(self) -> str:
        return type(self._scheduler).__name__

    @property
    def samplers(self) -> tuple[str, ...]:
        """The `sample` command's --scheduler choices that fit this model's family (DDPM or EDM)."""
        return samplers_for(self._scheduler.config)

    @property
    def default_sampler(self) -> str:
        """The sampler `sample` uses for this model without --scheduler."""
        return default_sampler(self._scheduler.config)

    def run(self, request: Request) -> Result:
        """Draw the request's images; UserError (one sentence) for anything the user can fix."""

        num_images, seed, steps = (_whole_number(request.num_images, "number of images"),
                                   _whole_number(request.seed, "seed"), _whole_number(request.steps, "steps"))
        if not 1 <= num_images <= MAX_IMAGES:
            raise UserError(f"number of images must be 1 to {MAX_IMAGES}; got {num_images}")
        sampler = request.sampler or self.default_sampler
        if sampler != OWN_SAMPLER and sampler not in self.samplers:
            raise UserError(f"sampler must be one of {', '.join(self.samplers)}; got {sampler!r}")
        interval = _guidance_interval(request.guidance_interval) if self.conditional else None
        self.pipe.scheduler = self._scheduler
        labels = resolve_conditioning(self.pipe, [c for c in request.classes if str(c).strip()] or None,
                                      guidance_interval=interval)
        # as `sample`: guidance scales only with labels, the classifier's only for a pipeline that carries one
        guidance_scale = request.guidance_scale if labels and self.conditional else None
        classifier_scale = request.classifier_scale if labels and self.classifier is not None else None
        states: list[tuple[Image.Image, int]] = []

        def keep_first_image(module, args, kwargs):  # the UNet's input at each step is x_t (CFG: [x_t, x_t])
            if len(states) < steps:
                sample = args[0] if args else kwargs["sample"]
                timestep = args[1] if len(args) > 1 else kwargs["timestep"]
                states.append((tensor_to_image(sample), int(timestep)))

        hook = self.pipe.unet.register_forward_pre_hook(keep_first_image, with_kwargs=True)
        start = time.perf_counter()
        try:
            images = generate(self.pipe, num_images, steps, seed, None if sampler == OWN_SAMPLER else sampler,
                              batch_size=min(num_images, MAX_IMAGES), class_labels=labels,
                              guidance_scale=guidance_scale, classifier_scale=classifier_scale,
                              guidance_interval=interval)
        finally:
            hook.remove()
        seconds = time.perf_counter() - start
        if sampler == OWN_SAMPLER:
            sampler = self.own_sampler
        guidance = self._limited_guidance(guidance_scale, interval) if labels and self.conditional else ""
        summary = (f"{num_images} image{'s' if num_images > 1 else ''}, {sampler} with {steps} steps, seed {seed}"
                   f"{guidance}: {seconds:.2f} s on {self.device.type}")
        return Result(images, image_grid(images), _strip(states, images[0], steps), seconds, summary)

    def _limited_guidance(self, scale: Optional[float], interval: Optional[Sequence[float]]) -> str:
        """', guidance 1.5 at sigma <= 4.5' for the summary where classifier-free guidance (the request's scale and
        interval, else the saved ones) runs at part of the noise levels only; nothing where it runs at every step
        or not at all."""
        scale, interval = guidance_in_effect(self.pipe, scale, interval)
        if scale == 1 or guides_every_step(interval):
            return ""
        return f", guidance {scale:g} at {interval_label(interval)}"


def interval_text(interval: Optional[Sequence[float]]) -> str:
    """A guidance interval as the page's field shows it: "LO HI" ("0 4.5"), blank for guidance at every step."""
    return "" if interval is None else " ".join(f"{v:g}" for v in interval)


def _guidance_interval(value) -> Optional[list[float]]:
    """Request.guidance_interval as the pipeline takes it: None (its saved interval), EVERY_STEP when blank, else
    [lo, hi] by `check_guidance_interval`'s rule."""
    if value is None:
        return None
    values = value.split() if isinstance(value, str) else list(value)
    return check_guidance_interval(values, "guidance interval") if values else EVERY_STEP


def _strip(states: list[tuple[Image.Image, int]], image: Image.Image, steps: int) -> Image.Image:
    """x_t (the UNet's input) at STRIP_COLUMNS evenly spaced steps, from the initial noise to the image, laid out as
    report.py's denoising strip."""
    shown = [(tile, "noise" if i == 0 else f"t={t}") for i, (tile, t) in enumerate(states)] + [(image, "image")]
    picked = [shown[i] for i in sorted(strip_indices(steps, STRIP_COLUMNS)) if i < len(shown)]
    return labelled_row([tile for tile, _ in picked], [label for _, label in picked])


def _whole_number(value, name: str) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or number != int(number):
        raise UserError(f"{name} must be a whole number; got {value!r}")
    return int(number)

"""GuidedDDPMPipeline: DDPM-family and EDM sampling with class labels, classifier-free guidance, classifier guidance
and learned variances.

This file is copied verbatim into every exported class-conditional (or learned-variance) pipeline folder, so a
user with only diffusers installed can load it:

    DiffusionPipeline.from_pretrained("run/pipeline", trust_remote_code=True)

It must therefore import nothing but torch and diffusers. The noise-aware classifier of classifier guidance is
either passed to `__call__` (any torch module that maps (x_t, t) to class logits) or an optional saved component
`classifier` of the pipeline; a saved one ships its own code (flowers_ddpm's classifier.py, copied to
`classifier/classifier.py`, which diffusers loads as a custom component with `trust_remote_code=True`), so this file
needs no classifier code either way.
"""

from __future__ import annotations

import inspect
from typing import Optional, Sequence, Union

import torch
from diffusers import DDPMScheduler, DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

Label = Union[int, str]


def is_edm_scheduler(scheduler) -> bool:
    """diffusers' EDM schedulers (EDMEulerScheduler, EDMDPMSolverMultistepScheduler): they precondition the UNet
    (c_in in `scale_model_input`, c_skip / c_out in `step`, c_noise as the timesteps) and start from noise of
    standard deviation `init_noise_sigma`."""
    return hasattr(scheduler, "precondition_outputs")


def check_interval(interval: Optional[Sequence[float]]) -> Optional[list]:
    """A guidance interval as [lo, hi] noise levels (0 <= lo < hi), or None for guidance at every step."""
    if interval is None:
        return None
    values = [float(v) for v in interval]
    if len(values) != 2 or not 0 <= values[0] < values[1]:
        raise ValueError(f"guidance_interval must be two noise levels 0 <= lo < hi; got {list(interval)}")
    return values


class GuidedDDPMPipeline(DiffusionPipeline):
    """A UNet2DModel (optionally class-conditional with a final "no class" embedding, optionally with 6 output
    channels for learned variances) and any DDPM-family scheduler, or an EDM-trained UNet and one of diffusers' EDM
    schedulers (the loop calls `scale_model_input` and starts from `init_noise_sigma`, as diffusers' pipelines do).

    Classifier-free guidance follows diffusers' convention: eps = eps(no class) + s * (eps(y) - eps(no class)), so
    `guidance_scale` 1 is the plain conditional model, 0 the unconditional one, and > 1 guides harder.

    `guidance_interval` (lo, hi) applies classifier-free guidance only at noise levels lo <= sigma <= hi, with
    sigma = sqrt((1 - alpha_bar_t) / alpha_bar_t) (an EDM scheduler's own sigma), the plain conditional model
    elsewhere (Kynkaanniemi et al. 2024, "Applying guidance in a limited interval improves sample and distribution
    quality in diffusion models"): guidance at high noise mostly pulls the samples' layout towards a few modes.
    None (the default) guides at every step.

    Classifier guidance (Dhariwal & Nichol 2021) with a noise-aware `classifier` and `classifier_scale` s, for
    conditional and unconditional UNets, combinable with classifier-free guidance: the ancestral DDPM sampler
    shifts the mean of p(x_{t-1} | x_t) by s * Sigma_t * grad log p(y | x_t) (the paper's Algorithm 1); every other
    scheduler gets the score-based form eps' = eps - sqrt(1 - alpha_bar_t) * s * grad log p(y | x_t) (Algorithm 2),
    rewritten for v- and x0-predicting models. Classifier guidance needs a DDPM-family scheduler (the noise-aware
    classifier is trained on its noise schedule).
    """

    model_cpu_offload_seq = "unet"
    _optional_components = ["classifier"]  # diffusers: may be None, saved as [null, null] in model_index.json

    def __init__(self, unet, scheduler, classifier=None, class_names: Optional[list] = None,
                 guidance_scale: float = 1.0, classifier_scale: float = 1.0,
                 guidance_interval: Optional[Sequence[float]] = None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, classifier=classifier)
        # the defaults of __call__, saved in model_index.json with the pipeline
        self.register_to_config(class_names=list(class_names) if class_names else None,
                                guidance_scale=float(guidance_scale), classifier_scale=float(classifier_scale),
                                guidance_interval=check_interval(guidance_interval))

    @property
    def num_classes(self) -> Optional[int]:
        """Number of real classes (the UNet's last class embedding is the "no class" token), or None."""
        embeds = self.unet.config.num_class_embeds
        return None if embeds is None else embeds - 1

    def label_ids(self, class_labels: Sequence[Label], classifier=None) -> list[int]:
        """Class indices from indices, digit strings or class names (case-insensitive); an unconditional UNet takes
        the classes of the guiding `classifier` (default: the pipeline's own)."""
        classifier = classifier if classifier is not None else getattr(self, "classifier", None)
        classifier_config = getattr(classifier, "config", None)
        num_classes = self.num_classes if self.num_classes is not None else getattr(classifier_config, "num_classes", 0)
        names = self.config.class_names or getattr(classifier_config, "class_names", None) or []
        names = [str(n).lower() for n in names]
        ids = []
        for label in class_labels:
            if isinstance(label, str) and label.strip().lower() in names:
                ids.append(names.index(label.strip().lower()))
            elif isinstance(label, int) or (isinstance(label, str) and label.strip().isdigit()):
                ids.append(int(label))
            else:
                raise ValueError(f"unknown class {label!r}; classes are {', '.join(names) or 'indices'}")
            if not 0 <= ids[-1] < (num_classes or 0):
                raise ValueError(f"class index {ids[-1]} is out of range for {num_classes} classes")
        return ids

    def _model_output(self, image, t, labels, guidance_scale: float) -> torch.Tensor:
        if labels is None:
            return self.unet(image, t).sample
        if guidance_scale == 1.0:
            return self.unet(image, t, class_labels=labels).sample
        null = torch.full_like(labels, self.num_classes)
        both = self.unet(torch.cat([image, image]), t, class_labels=torch.cat([labels, null])).sample
        conditional, unconditional = both.chunk(2)
        channels = image.shape[1]
        eps = unconditional[:, :channels] + guidance_scale * (conditional[:, :channels] - unconditional[:, :channels])
        return torch.cat([eps, conditional[:, channels:]], dim=1)  # learned variances: the conditional model's

    def noise_level(self, t) -> float:
        """sigma of timestep t: sqrt((1 - alpha_bar_t) / alpha_bar_t) for DDPM-family schedulers (infinite where
        no signal is left, the last timestep of a zero-terminal-SNR schedule), the EDM scheduler's sigma at the
        step whose timestep (c_noise) is t."""
        if is_edm_scheduler(self.scheduler):
            index = int(torch.argmin((self.scheduler.timesteps.to(torch.float64) - float(t)).abs()))
            return float(self.scheduler.sigmas[index])
        alpha_bar = float(self.scheduler.alphas_cumprod[int(t)])
        return ((1 - alpha_bar) / alpha_bar) ** 0.5 if alpha_bar > 0 else float("inf")

    def _for_scheduler(self, output, image) -> torch.Tensor:
        """Keep the variance channels only for schedulers that use them (DDPM / DPM-Solver with learned variance)."""
        if output.shape[1] == image.shape[1]:
            return output
        uses_variance = "variance_type" in inspect.signature(type(self.scheduler).__init__).parameters
        if uses_variance and self.scheduler.config.variance_type in ("learned", "learned_range"):
            return output
        return output[:, : image.shape[1]]

    def scheduler_input(self, image, t, labels: Optional[torch.Tensor] = None, guidance_scale: float = 1.0):
        """The model output of one denoising step, shaped for `self.scheduler.step`; a class-conditional model
        without `labels` runs unconditionally through the "no class" token."""
        if labels is None and self.num_classes is not None:
            labels = torch.full((image.shape[0],), self.num_classes, device=image.device, dtype=torch.long)
        return self._for_scheduler(self._model_output(image, t, labels, guidance_scale), image)

    def classifier_gradient(self, classifier, image, t, targets, scale: float) -> torch.Tensor:
        """scale * grad_x log p(targets | x_t = image, t) of the noise-aware classifier (computed in float32)."""
        with torch.enable_grad():
            x = image.detach().to(getattr(classifier, "dtype", torch.float32)).requires_grad_(True)
            log_probs = torch.log_softmax(classifier(x, t).float(), dim=-1)
            chosen = log_probs[torch.arange(len(targets), device=x.device), targets].sum()
            return scale * torch.autograd.grad(chosen, x)[0]

    def _ancestral_shift(self, output, image, t, gradient) -> torch.Tensor:
        """Sigma_t * gradient: the shift of the DDPM posterior mean, with the variance the scheduler samples with."""
        channels = image.shape[1]
        predicted = output[:, channels:] if output.shape[1] > channels else None
        variance = self.scheduler._get_variance(t, predicted_variance=predicted)  # diffusers' own Sigma_t
        kind = self.scheduler.config.variance_type
        if kind in ("learned_range", "fixed_large_log"):  # these return log-variances
            variance = variance.exp()
        elif kind == "fixed_small_log":  # returns the standard deviation
            variance = variance**2
        return variance.to(gradient.device, gradient.dtype) * gradient

    def _score_guided(self, output, image, t, gradient) -> torch.Tensor:
        """Algorithm 2: eps' = eps - sqrt(1 - a) * gradient with a = alpha_bar_t, written for the prediction type
        (x0' = x0 + (1 - a) / sqrt(a) * gradient, v' = v - sqrt((1 - a) / a) * gradient)."""
        a = self.scheduler.alphas_cumprod[int(t)].to(gradient.device, torch.float32)
        coefficient = {"epsilon": -(1 - a).sqrt(), "sample": (1 - a) / a.sqrt(),
                       "v_prediction": -((1 - a) / a).sqrt()}[self.scheduler.config.prediction_type]
        channels = image.shape[1]
        guided = output[:, :channels] + (coefficient * gradient).to(output.dtype)
        return torch.cat([guided, output[:, channels:]], dim=1)

    def _labels(self, class_labels, batch_size: int, classifier, device):
        """(UNet labels or None, classifier targets or None) for a batch."""
        ids = self.label_ids(class_labels, classifier) if class_labels is not None else None
        unet_labels = None
        if self.num_classes is not None:
            unet_labels = torch.tensor(ids or [self.num_classes] * batch_size, device=device, dtype=torch.long)
        targets = torch.tensor(ids, device=device, dtype=torch.long) if classifier is not None else None
        return unet_labels, targets

    @torch.no_grad()
    def __call__(self, class_labels: Optional[Sequence[Label]] = None, batch_size: Optional[int] = None,
                 guidance_scale: Optional[float] = None, generator=None, num_inference_steps: int = 1000,
                 output_type: str = "pil", return_dict: bool = True, classifier=None,
                 classifier_scale: Optional[float] = None, guidance_interval: Optional[Sequence[float]] = None):
        """Generate one image per class label (or `batch_size` unconditional images).

        Class-conditional models need `class_labels` (indices or names from `config.class_names`); without them
        they sample unconditionally through the "no class" token. With a noise-aware `classifier` (a module
        mapping (x_t, t) to logits; default: the pipeline's saved one) the samples are also guided towards
        `class_labels` with `classifier_scale` (0 turns classifier guidance off). Scales left out take the
        pipeline's saved defaults (`config.guidance_scale`, `config.classifier_scale`), as does a left-out
        `guidance_interval` (`config.guidance_interval`; see the class).
        """
        if classifier is not None and class_labels is None:
            raise ValueError("classifier guidance needs class_labels (the classes to guide towards)")
        guidance_scale = self.config.guidance_scale if guidance_scale is None else guidance_scale
        classifier_scale = self.config.classifier_scale if classifier_scale is None else classifier_scale
        # pipelines saved before the interval existed have no such config entry
        interval = check_interval(guidance_interval if guidance_interval is not None
                                  else getattr(self.config, "guidance_interval", None))
        if classifier is None and class_labels is not None:  # a saved classifier guides only towards given labels
            classifier = getattr(self, "classifier", None)
        if classifier is not None and classifier_scale != 0 and is_edm_scheduler(self.scheduler):
            raise ValueError("classifier guidance needs a DDPM-family scheduler; this pipeline samples with an EDM "
                             "scheduler")
        if class_labels is not None and self.num_classes is None and classifier is None:
            raise ValueError("this pipeline's UNet is not class-conditional; call it without class_labels")
        if class_labels is not None:
            batch_size = len(class_labels)
        batch_size = batch_size or 1
        device = self._execution_device
        labels, targets = self._labels(class_labels, batch_size, classifier, device)
        if classifier_scale == 0:  # the classifier still names the classes, but does not guide
            classifier = None
        if self.num_classes is not None and class_labels is None:
            guidance_scale = 1.0
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        shape = (batch_size, self.unet.config.in_channels, *size)
        self.scheduler.set_timesteps(num_inference_steps)
        image = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
        image = image * self.scheduler.init_noise_sigma  # 1 for DDPM-family schedulers
        ancestral = isinstance(self.scheduler, DDPMScheduler)
        step_options = {}
        if "use_clipped_model_output" in inspect.signature(self.scheduler.step).parameters:
            # DDIM: x_prev = sqrt(a_prev) * x0 + sqrt(1 - a_prev) * eps, with x0 clipped to [-1, 1] (clip_sample,
            # inherited from the training scheduler's config) but eps, by default, the unclipped model's. Guidance
            # moves x0 by d and eps by -sqrt(a / (1 - a)) * d; where the guided x0 leaves [-1, 1] (the pixels
            # guidance pushes hardest, and nearly all at large t), the clip drops the x0 term and the eps term
            # carries the guidance into x_prev with the opposite sign: guidance then pushes away from the class.
            # As in guided-diffusion (and DDPM's posterior mean), re-derive eps from the clipped x0 so the step
            # stays consistent.
            step_options["use_clipped_model_output"] = True
        for t in self.progress_bar(self.scheduler.timesteps):
            # EDM: c_in * x (the timesteps t are already c_noise); DDPM-family schedulers return the image as is
            model_input = self.scheduler.scale_model_input(image, t)
            scale = guidance_scale
            if interval is not None and not interval[0] <= self.noise_level(t) <= interval[1]:
                scale = 1.0  # outside the interval: the conditional model alone (one UNet evaluation)
            output = self.scheduler_input(model_input, t, labels, scale)
            shift = None
            if classifier is not None:
                gradient = self.classifier_gradient(classifier, image, t, targets, classifier_scale)
                if ancestral:
                    shift = self._ancestral_shift(output, image, t, gradient)
                else:
                    output = self._score_guided(output, image, t, gradient)
            image = self.scheduler.step(output, t, image, generator=generator, **step_options).prev_sample
            if shift is not None:
                image = image + shift.to(image.dtype)
        image = (image / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
        if output_type == "pil":
            image = self.numpy_to_pil(image)
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)

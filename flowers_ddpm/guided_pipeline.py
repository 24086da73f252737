"""GuidedDDPMPipeline: DDPM-family sampling with class labels, classifier-free guidance and learned variances.

This file is copied verbatim into every exported class-conditional (or learned-variance) pipeline folder, so a
user with only diffusers installed can load it:

    DiffusionPipeline.from_pretrained("run/pipeline", trust_remote_code=True)

It must therefore import nothing but torch and diffusers.
"""

from __future__ import annotations

import inspect
from typing import Optional, Sequence, Union

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

Label = Union[int, str]


class GuidedDDPMPipeline(DiffusionPipeline):
    """A UNet2DModel (optionally class-conditional with a final "no class" embedding, optionally with 6 output
    channels for learned variances) and any DDPM-family scheduler.

    Classifier-free guidance follows diffusers' convention: eps = eps(no class) + s * (eps(y) - eps(no class)), so
    `guidance_scale` 1 is the plain conditional model, 0 the unconditional one, and > 1 guides harder.
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet, scheduler, class_names: Optional[list] = None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_to_config(class_names=list(class_names) if class_names else None)

    @property
    def num_classes(self) -> Optional[int]:
        """Number of real classes (the UNet's last class embedding is the "no class" token), or None."""
        embeds = self.unet.config.num_class_embeds
        return None if embeds is None else embeds - 1

    def label_ids(self, class_labels: Sequence[Label]) -> list[int]:
        """Class indices from indices, digit strings or class names (case-insensitive)."""
        names = [str(n).lower() for n in (self.config.class_names or [])]
        ids = []
        for label in class_labels:
            if isinstance(label, str) and label.strip().lower() in names:
                ids.append(names.index(label.strip().lower()))
            elif isinstance(label, int) or (isinstance(label, str) and label.strip().isdigit()):
                ids.append(int(label))
            else:
                raise ValueError(f"unknown class {label!r}; classes are {', '.join(names) or 'indices'}")
            if not 0 <= ids[-1] < (self.num_classes or 0):
                raise ValueError(f"class index {ids[-1]} is out of range for {self.num_classes} classes")
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

    @torch.no_grad()
    def __call__(self, class_labels: Optional[Sequence[Label]] = None, batch_size: Optional[int] = None,
                 guidance_scale: float = 1.0, generator=None, num_inference_steps: int = 1000,
                 output_type: str = "pil", return_dict: bool = True):
        """Generate one image per class label (or `batch_size` unconditional images).

        Class-conditional models need `class_labels` (indices or names from `config.class_names`); without them
        they sample unconditionally through the "no class" token.
        """
        if class_labels is not None and self.num_classes is None:
            raise ValueError("this pipeline's UNet is not class-conditional; call it without class_labels")
        if class_labels is not None:
            batch_size = len(class_labels)
        batch_size = batch_size or 1
        device = self._execution_device
        labels = None
        if self.num_classes is not None:
            ids = self.label_ids(class_labels) if class_labels is not None else [self.num_classes] * batch_size
            labels = torch.tensor(ids, device=device, dtype=torch.long)
            guidance_scale = guidance_scale if class_labels is not None else 1.0
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        shape = (batch_size, self.unet.config.in_channels, *size)
        image = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
        self.scheduler.set_timesteps(num_inference_steps)
        for t in self.progress_bar(self.scheduler.timesteps):
            output = self.scheduler_input(image, t, labels, guidance_scale)
            image = self.scheduler.step(output, t, image, generator=generator).prev_sample
        image = (image / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
        if output_type == "pil":
            image = self.numpy_to_pil(image)
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)

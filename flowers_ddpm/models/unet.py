"""UNet presets and noise-scheduler construction; presets are plain UNet2DModel kwargs (a config is data)."""

from __future__ import annotations

from typing import Optional

from diffusers import DDPMScheduler, EDMDPMSolverMultistepScheduler, UNet2DModel

from ..config.sections import ModelSettings
from ..errors import UserError

# Pixel resolutions at which the ADM UNet has self-attention (Dhariwal & Nichol 2021, final architecture).
ADM_ATTENTION_RESOLUTIONS = (32, 16, 8)

PRESETS: dict[str, dict] = {
    # The UNet of diffusers' unconditional example (114M parameters at 64x64).
    "ddpm": dict(
        layers_per_block=2,
        block_out_channels=(128, 128, 256, 256, 512, 512),
        down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
    ),
    # For tests and CPU smoke runs: ~0.5M parameters, works from 16x16.
    "tiny": dict(
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=16,
    ),
    # CPU-sized (~1.1M parameters): three levels, self-attention only at the lowest (1/4 resolution), where it is
    # cheap. The recipe ablation's model (docs/recipes.md); resolution a multiple of 4.
    "small": dict(
        layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=16,
    ),
    # ADM (the paper's final architecture) scaled for 64x64 Flowers; the "ADM preset" table of
    # docs/adm-and-guidance.md maps every paper choice to these settings. Block types depend on the resolution
    # (attention at 32, 16 and 8 px) and are filled in by `unet_kwargs`.
    "adm": dict(
        layers_per_block=2,
        block_out_channels=(128, 256, 384, 512),
        attention_head_dim=64,
        downsample_type="resnet",
        upsample_type="resnet",
        resnet_time_scale_shift="scale_shift",
        dropout=0.1,
        norm_num_groups=32,
    ),
}


def adm_block_types(resolution: int, num_levels: int,
                    attention_resolutions: tuple = ADM_ATTENTION_RESOLUTIONS) -> dict:
    """Down/up block types of an ADM UNet: BigGAN (resnet) resampling everywhere, attention where the feature map
    is one of `attention_resolutions` pixels wide."""
    down = []
    for level in range(num_levels):
        attention = resolution // 2**level in attention_resolutions
        down.append("AttnDownBlock2D" if attention else "ResnetDownsampleBlock2D")
    up = [name.replace("AttnDownBlock2D", "AttnUpBlock2D").replace("ResnetDownsampleBlock2D", "ResnetUpsampleBlock2D")
          for name in reversed(down)]
    return dict(down_block_types=tuple(down), up_block_types=tuple(up))


def unet_kwargs(preset: str, overrides: Optional[dict] = None, resolution: int = 64) -> dict:
    """The UNet2DModel kwargs of a preset at `resolution` with explicit overrides merged over it."""
    kwargs = dict(PRESETS[preset])
    if preset == "adm":
        levels = len((overrides or {}).get("block_out_channels", kwargs["block_out_channels"]))
        kwargs.update(adm_block_types(resolution, levels))
    kwargs.update(overrides or {})
    return kwargs


def downsample_factor(preset: str, overrides: Optional[dict] = None) -> int:
    """How many times the UNet halves the resolution (the resolution must be a multiple of this)."""
    return 2 ** (len(unet_kwargs(preset, overrides)["down_block_types"]) - 1)


# Set from the run (RGB images, the training resolution, learned variances, classes), never from a loaded config.
RUN_SET_KEYS = ("sample_size", "in_channels", "out_channels", "num_class_embeds")


def load_unet_config(name_or_path: str) -> dict:
    """The architecture kwargs of a UNet2DModel config (a folder holding config.json, or a Hub id), as diffusers'
    example reads --model_config_name_or_path; the keys the run sets itself are dropped."""
    try:
        config = UNet2DModel.load_config(name_or_path)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read a UNet2DModel config from {name_or_path}: {str(e).splitlines()[0]}") from None
    return {k: v for k, v in config.items() if not k.startswith("_") and k not in RUN_SET_KEYS}


def unet_overrides(model: ModelSettings) -> dict:
    """What is merged over the preset: --model_config_name_or_path's config < --unet_config < --dropout."""
    overrides = load_unet_config(model.model_config_name_or_path) if model.model_config_name_or_path else {}
    overrides.update(model.unet_config or {})
    if model.dropout is not None:
        overrides["dropout"] = model.dropout
    return overrides


def check_preset(model: ModelSettings, resolution: int, pretrained: bool = False) -> None:
    """A one-line UserError unless the preset exists and `resolution` suits its downsampling (a pretrained UNet
    brings its own architecture, so only the name is checked then)."""
    if model.model_preset not in PRESETS:
        raise UserError(f"model_preset must be one of {', '.join(PRESETS)}; got {model.model_preset!r}")
    factor = downsample_factor(model.model_preset, unet_overrides(model))
    name = model.model_config_name_or_path or model.model_preset
    if not pretrained and resolution % factor:
        raise UserError(f"resolution must be divisible by {factor} (the {name} UNet's downsampling factor); "
                        f"got {resolution}")


def build_unet(preset: str, resolution: int, overrides: Optional[dict] = None, num_classes: Optional[int] = None,
               learn_sigma: bool = False):
    """A freshly initialised UNet2DModel for RGB images at `resolution`.

    With `num_classes` it is class-conditional with `num_classes + 1` class embeddings: index `num_classes` is the
    "no class" token used for classifier-free guidance. With `learn_sigma` it outputs 6 channels: the prediction
    and the interpolation weights of the learned variance (Improved DDPM's `learned_range`).
    """
    kwargs = unet_kwargs(preset, overrides, resolution)
    if num_classes is not None:
        kwargs["num_class_embeds"] = num_classes + 1
    return UNet2DModel(sample_size=resolution, in_channels=3, out_channels=6 if learn_sigma else 3, **kwargs)


def build_noise_scheduler(num_steps: int, beta_schedule: str, prediction_type: str, learn_sigma: bool = False):
    """The DDPMScheduler used for training (and exported with the pipeline).

    Its config is also what every sampler is built from (`DDIMScheduler.from_config`, also in plain diffusers), so
    the sampling settings measured best in docs/sampling.md are pinned here rather than left to diffusers'
    defaults: the timestep spacing of `timestep_spacing_for`, DPM-Solver's steps of `log_snr_steps_for` and x0
    clipped to [-1, 1] (without it, briefly trained epsilon models diverge at large t).
    """
    scheduler = DDPMScheduler(num_train_timesteps=num_steps, beta_schedule=beta_schedule,
                              prediction_type=prediction_type,
                              variance_type="learned_range" if learn_sigma else "fixed_small",
                              timestep_spacing=timestep_spacing_for(beta_schedule), clip_sample=True,
                              clip_sample_range=1.0)
    if log_snr_steps_for(beta_schedule):
        # a setting of DPMSolverMultistepScheduler, not of DDPMScheduler: diffusers keeps such keys of compatible
        # schedulers in the config, and `DPMSolverMultistepScheduler.from_config` (ours or plain diffusers') reads it
        scheduler.register_to_config(use_lu_lambdas=True)
    return scheduler


# schedules whose alpha_bar is still far from 0 where "leading" spacing starts a few-step sampler (t = 940 for 20
# DPM-Solver++ steps): the cosine schedule keeps 9% of the signal there (alpha_bar 0.0084), the linear one 1.1%
TRAILING_SCHEDULES = ("squaredcos_cap_v2",)


def timestep_spacing_for(beta_schedule: str) -> str:
    """The exported timestep spacing (docs/sampling.md): "trailing" for the cosine schedule, so a few-step sampler
    starts at the last training timestep, whose input is pure noise like the sampler's first image (Lin et al.
    2024; measured 22% lower Frechet ratio on cifar10-5k); "leading" for the others, where the two tied and
    classifier guidance with few DDIM steps measured worse from t = 999 (a noise-aware classifier reads nothing
    there, and the score-based guidance magnifies its gradient by (1 - alpha_bar) / sqrt(alpha_bar)). "linspace"
    does not match diffusers' DDIM, which steps by num_train_timesteps // steps."""
    return "trailing" if beta_schedule in TRAILING_SCHEDULES else "leading"


# schedules whose DPM-Solver++ steps are spaced uniformly in log-SNR (diffusers' `use_lu_lambdas`, the spacing of
# Lu et al. 2022) instead of uniformly in t
LOG_SNR_STEP_SCHEDULES = ("squaredcos_cap_v2",)


def log_snr_steps_for(beta_schedule: str) -> bool:
    """Whether exports of this schedule ask DPM-Solver++ for steps uniform in log-SNR (docs/sampling.md): on the
    cosine schedule they lowered the Frechet ratio of every cifar10-5k row measured (3-9% at 20 steps, issue 16
    twelfth session), on the linear schedule they raised it by 36%, so linear-schedule exports keep uniform t."""
    return beta_schedule in LOG_SNR_STEP_SCHEDULES


def build_edm_scheduler(sigma_data: float = 0.5, sigma_min: float = 0.002, sigma_max: float = 80.0,
                        prediction_type: str = "epsilon"):
    """The scheduler of an EDM-trained UNet (exported with the pipeline): diffusers' EDM DPM-Solver++ (2nd order,
    Karras sigmas), whose `precondition_inputs` / `precondition_noise` / `precondition_outputs` the EDM objective
    also trains through, so training and sampling share one definition of c_in, c_noise, c_skip and c_out."""
    return EDMDPMSolverMultistepScheduler(sigma_min=sigma_min, sigma_max=sigma_max, sigma_data=sigma_data,
                                          prediction_type=prediction_type, algorithm_type="dpmsolver++",
                                          solver_order=2, final_sigmas_type="zero")

"""UNet presets and noise-scheduler construction; presets are plain UNet2DModel kwargs (a config is data)."""

from __future__ import annotations

from typing import Optional

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
}


def unet_kwargs(preset: str, overrides: Optional[dict] = None) -> dict:
    """The UNet2DModel kwargs of a preset with explicit overrides merged over it."""
    kwargs = dict(PRESETS[preset])
    kwargs.update(overrides or {})
    return kwargs


def downsample_factor(preset: str, overrides: Optional[dict] = None) -> int:
    """How many times the UNet halves the resolution (the resolution must be a multiple of this)."""
    return 2 ** (len(unet_kwargs(preset, overrides)["down_block_types"]) - 1)


def build_unet(preset: str, resolution: int, overrides: Optional[dict] = None):
    """A freshly initialised UNet2DModel for RGB images at `resolution`."""
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=resolution, in_channels=3, out_channels=3, **unet_kwargs(preset, overrides))


def build_noise_scheduler(num_steps: int, beta_schedule: str, prediction_type: str):
    """The DDPMScheduler used for training (and exported with the pipeline)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=num_steps, beta_schedule=beta_schedule, prediction_type=prediction_type)

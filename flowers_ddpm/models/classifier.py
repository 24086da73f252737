"""The noise-aware classifier of classifier guidance (Dhariwal & Nichol 2021): p(y | x_t, t) for noised images x_t.

As in the paper it is the encoder half of the diffusion UNet (time embedding, downsampling blocks, middle block,
all diffusers parts) followed by attention pooling and a linear layer to the class logits. It is a diffusers
`ModelMixin`, so `save_pretrained` writes `config.json` + `diffusion_pytorch_model.safetensors` and
`from_pretrained` reads them back; the class names and the noise schedule it was trained with are part of its
config.

This module imports only torch and diffusers (like pipelines/guided.py), so it can be used next to a pipeline
folder without the rest of flowers_ddpm.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import AttentionPooling, TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D, get_down_block
from torch import nn


class AttentionPool2d(nn.Module):
    """The paper's pooling head: GroupNorm + SiLU, then one attention query (the mean token) over all positions.

    diffusers' `AttentionPooling` does the attention, but it gives only the mean token a position embedding; the
    paper's head (guided-diffusion's AttentionPool2d) learns one for every spatial position, which we add here.
    """

    def __init__(self, channels: int, num_positions: int, head_channels: int, norm_groups: int, eps: float):
        super().__init__()
        self.norm = nn.GroupNorm(norm_groups, channels, eps=eps)
        self.positions = nn.Parameter(torch.randn(num_positions, channels) / channels**0.5)
        self.pool = AttentionPooling(num_heads=max(1, channels // head_channels), embed_dim=channels)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        tokens = nn.functional.silu(self.norm(features)).flatten(2).transpose(1, 2)  # (B, H*W, C)
        return self.pool(tokens + self.positions.to(tokens.dtype))


class NoiseAwareClassifier(ModelMixin, ConfigMixin):
    """Class logits of a noised image x_t at diffusion timestep t: `classifier(x_t, t) -> (B, num_classes)`."""

    @register_to_config
    def __init__(self, sample_size: int, num_classes: int, class_names: Optional[list] = None, in_channels: int = 3,
                 block_out_channels: Sequence[int] = (32, 64), down_block_types: Sequence[str] = ("DownBlock2D",
                 "AttnDownBlock2D"), layers_per_block: int = 1, attention_head_dim: Optional[int] = 8,
                 norm_num_groups: int = 32, norm_eps: float = 1e-5, resnet_time_scale_shift: str = "default",
                 downsample_type: str = "conv", dropout: float = 0.0, pool_head_channels: int = 64,
                 noise_schedule: Optional[dict] = None):
        super().__init__()
        time_dim = block_out_channels[0] * 4  # as in UNet2DModel
        self.time_proj = Timesteps(block_out_channels[0], flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(block_out_channels[0], time_dim)
        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], kernel_size=3, padding=1)
        self.down_blocks = nn.ModuleList()
        channels = block_out_channels[0]
        for i, block_type in enumerate(down_block_types):
            self.down_blocks.append(get_down_block(
                block_type, num_layers=layers_per_block, in_channels=channels, out_channels=block_out_channels[i],
                temb_channels=time_dim, add_downsample=i < len(down_block_types) - 1, resnet_eps=norm_eps,
                resnet_act_fn="silu", resnet_groups=norm_num_groups,
                attention_head_dim=attention_head_dim or block_out_channels[i], downsample_padding=1,
                resnet_time_scale_shift=resnet_time_scale_shift, downsample_type=downsample_type, dropout=dropout))
            channels = block_out_channels[i]
        self.mid_block = UNetMidBlock2D(
            in_channels=channels, temb_channels=time_dim, dropout=dropout, resnet_eps=norm_eps, resnet_act_fn="silu",
            resnet_time_scale_shift=resnet_time_scale_shift, attention_head_dim=attention_head_dim or channels,
            resnet_groups=norm_num_groups)
        side = sample_size // 2 ** (len(down_block_types) - 1)
        self.pool = AttentionPool2d(channels, side * side, pool_head_channels, norm_num_groups, norm_eps)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        """Logits (B, num_classes) of `sample` (B, C, H, W in [-1, 1], noised to `timestep`: int or (B,))."""
        timesteps = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(sample.shape[0])
        emb = self.time_embedding(self.time_proj(timesteps).to(self.dtype))
        hidden = self.conv_in(sample)
        for block in self.down_blocks:
            hidden, _ = block(hidden_states=hidden, temb=emb)
        hidden = self.mid_block(hidden, emb)
        return self.head(self.pool(hidden))


def classifier_for_unet(unet_kwargs: dict, resolution: int, class_names: list,
                        noise_schedule: dict) -> NoiseAwareClassifier:
    """A classifier whose encoder is that of the UNet2DModel built from `unet_kwargs` (a preset), for
    `class_names`, trained on the noise schedule `noise_schedule` (a DDPMScheduler config)."""
    keys = ("block_out_channels", "down_block_types", "layers_per_block", "attention_head_dim", "norm_num_groups",
            "norm_eps", "resnet_time_scale_shift", "downsample_type", "dropout")
    encoder = {k: unet_kwargs[k] for k in keys if k in unet_kwargs}
    head = encoder.get("attention_head_dim") or 64
    return NoiseAwareClassifier(sample_size=resolution, num_classes=len(class_names), class_names=list(class_names),
                                pool_head_channels=head, noise_schedule=noise_schedule, **encoder)

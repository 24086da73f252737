"""The `adm` preset builds at 32 and 64 px and matches the "paper choice -> UNet2DModel setting" table of
docs/adm-and-guidance.md."""

from __future__ import annotations

import pytest
import torch
from accelerate import init_empty_weights

from flowers_ddpm.models.unet import build_unet


def attention_resolutions(unet, resolution: int) -> set[int]:
    """Pixel widths of the down-path levels that have self-attention."""
    return {resolution // 2**i for i, block in enumerate(unet.down_blocks) if getattr(block, "attentions", None)}


@pytest.mark.parametrize("resolution, expected_attention", [(64, {32, 16, 8}), (32, {32, 16, 8})])
def test_adm_preset_matches_the_paper_table(resolution, expected_attention):
    with init_empty_weights():  # structure only: no memory or time spent on 100M random weights
        unet = build_unet("adm", resolution, num_classes=102, learn_sigma=True)
    assert attention_resolutions(unet, resolution) == expected_attention
    assert unet.mid_block.attentions[0] is not None
    for block in unet.down_blocks[:-1]:  # BigGAN residual downsampling on every level
        assert type(block.downsamplers[0]).__name__ == "ResnetBlock2D" and block.downsamplers[0].down
    for block in unet.up_blocks[:-1]:
        assert type(block.upsamplers[0]).__name__ == "ResnetBlock2D" and block.upsamplers[0].up
    resnet = unet.down_blocks[0].resnets[0]
    assert resnet.time_embedding_norm == "scale_shift"  # adaptive group normalisation
    assert resnet.time_emb_proj.out_features == 2 * resnet.out_channels  # a scale and a shift per channel
    assert resnet.dropout.p == 0.1
    for block in unet.down_blocks:
        for attention in getattr(block, "attentions", None) or []:
            assert attention.heads * 64 == attention.inner_dim  # 64 channels per head
    assert [len(b.resnets) for b in unet.down_blocks] == [2] * 4 and [len(b.resnets) for b in unet.up_blocks] == [3] * 4
    assert unet.config.block_out_channels == (128, 256, 384, 512)
    assert unet.class_embedding.num_embeddings == 103 and unet.conv_out.out_channels == 6


def test_adm_preset_runs_forward_at_small_width():
    unet = build_unet("adm", 32, {"block_out_channels": (32, 64, 64, 64), "attention_head_dim": 16,
                                  "norm_num_groups": 8}, num_classes=3)
    out = unet(torch.randn(2, 3, 32, 32), torch.tensor([5, 900]), class_labels=torch.tensor([0, 3])).sample
    assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all()

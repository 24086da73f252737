"""Non-leaking augmentation (issue 16, `--augment_p`): the augment pipe and its labels, the UNet's training-only
augment conditioning (exactly the plain UNet at label 0, dropped at export), and augmented runs that export plain
diffusers pipelines and resume exactly."""

from __future__ import annotations


import pytest
import torch
from safetensors.torch import load_file

from flowers_ddpm.cli import main
from flowers_ddpm.config.loading import build_config
from flowers_ddpm.errors import UserError
from flowers_ddpm.models.augment_conditioning import (
    attach_augment_conditioning,
    augment_labels,
    without_augment_conditioning,
)
from flowers_ddpm.models.unet import build_unet
from flowers_ddpm.objectives.augment import LABEL_DIM, AugmentPipe

from .conftest import resume_from_copy, tiny_train_args


def images(n: int = 8, size: int = 16) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_p0_leaves_the_batch_alone_with_zero_labels():
    x = images()
    out, labels = AugmentPipe(0.0)(x)
    assert torch.equal(out, x) and labels.shape == (8, LABEL_DIM) and not labels.any()


def test_p1_augments_every_image_and_says_how():
    torch.manual_seed(0)
    x = images(16)
    out, labels = AugmentPipe(1.0)(x)
    assert out.shape == x.shape and labels.shape == (16, LABEL_DIM)
    changed = (out - x).flatten(1).abs().amax(1) > 0.05
    assert changed.all() and (labels.abs().sum(1) > 0).all()
    assert labels[:, 3:].ne(0).all()  # scale, rotation, anisotropy and colour were drawn for every image


def test_integer_translation_and_flip_move_whole_pixels_as_labelled():
    torch.manual_seed(1)
    x = images(8)
    only_integer = AugmentPipe(1.0, scale_std=0, rotate_max=0, aniso_std=0, brightness_std=0, contrast_std=0,
                               saturation_std=0)
    out, labels = only_integer(x)
    assert not labels[:, 3:].any()
    for image, moved, (flip, tx, ty) in zip(x, out, labels[:, :3].tolist()):
        source = image.flip(-1) if flip else image
        dx, dy = round(tx * 16) * (-1 if flip else 1), round(ty * 16)  # output pixel (r, c) = source (r+dy, c+dx)
        torch.testing.assert_close(moved[:, 4:12, 4:12], source[:, 4 + dy:12 + dy, 4 + dx:12 + dx], atol=1e-5, rtol=0)


def test_label_zero_is_the_plain_unet_and_the_export_has_no_extra_weights():
    torch.manual_seed(0)
    unet = build_unet("tiny", 16, {}, None, False)
    plain_keys = set(unet.state_dict())
    attach_augment_conditioning(unet, LABEL_DIM)
    torch.nn.init.normal_(unet.time_embedding.augment_embedding.weight)  # as if trained
    x, t = images(4), torch.tensor([1, 10, 100, 999])
    _, labels = AugmentPipe(1.0)(x)
    with torch.no_grad():
        without = unet(x, t).sample
        with augment_labels(unet, torch.zeros(4, LABEL_DIM)):
            at_zero = unet(x, t).sample
        with augment_labels(unet, labels):
            augmented = unet(x, t).sample
        with without_augment_conditioning(unet) as exported:
            assert set(exported.state_dict()) == plain_keys
            assert torch.equal(exported(x, t).sample, without)
    assert torch.equal(at_zero, without) and not torch.allclose(augmented, without)
    assert "time_embedding.augment_embedding.weight" in unet.state_dict()  # back after the export


def test_augment_p_is_checked():
    assert build_config({}, {}).objective.augment_p == 0.0
    assert build_config({}, {"augment_p": 0.12}).objective.augment_p == 0.12
    for bad in (1.5, -0.1):
        with pytest.raises(UserError, match="augment_p"):
            build_config({}, {"augment_p": bad})


@pytest.mark.slow
@pytest.mark.parametrize("flags", [{}, {"objective": "edm", "class_conditional": True, "phema_sigma_rel": "0.05,0.1",
                                       "phema_snapshot_steps": 3}], ids=["ddpm", "edm-class-phema"])
def test_augmented_run_resumes_exactly_and_exports_a_plain_pipeline(image_folder, tmp_path, flags, capsys):
    flags = dict(augment_p=0.5, max_train_steps=6, checkpointing_steps=3, train_batch_size=3, shuffle_buffer_size=10,
                 **flags)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(["train", *tiny_train_args(image_folder, straight, **flags)]) == 0
    assert resume_from_copy(image_folder, straight, resumed, 3, **flags) == 0
    a, b = straight / "checkpoints" / "checkpoint-6", resumed / "checkpoints" / "checkpoint-6"
    for name in ("model.safetensors", "ema.safetensors"):
        weights_a, weights_b = load_file(a / name), load_file(b / name)
        assert weights_a.keys() == weights_b.keys() and all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    layer = weights_a["time_embedding.augment_embedding.weight"]
    assert layer.shape[1] == LABEL_DIM and layer.abs().sum() > 0  # the conditioning trained (it starts at zero)

    from diffusers import DiffusionPipeline, UNet2DModel

    pipe = DiffusionPipeline.from_pretrained(str(straight / "pipeline"), trust_remote_code=True)
    assert type(pipe.unet) is UNet2DModel
    fresh = UNet2DModel.from_config(pipe.unet.config)
    assert sum(p.numel() for p in pipe.unet.parameters()) == sum(p.numel() for p in fresh.parameters())
    exported = load_file(straight / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    assert set(exported) == set(fresh.state_dict())
    ema = load_file(a / "ema.safetensors")  # the export is the EMA weights minus the augment layer
    assert all(torch.equal(ema[k], exported[k]) for k in exported)

    off = tiny_train_args(image_folder, resumed, resume_from_checkpoint="latest", **{**flags, "augment_p": 0.0,
                                                                                     "max_train_steps": 9})
    capsys.readouterr()
    assert main(["train", *off]) == 2  # the checkpoint's UNet has the augment layer: refused in one line
    assert "augment_p (checkpoint: 0.5, now: 0.0)" in capsys.readouterr().err
    if "phema_sigma_rel" in flags:
        assert main(["ema-reconstruct", "--run_dir", str(straight), "--sigma_rel", "0.1"]) == 0
        rebuilt = straight / "ema-reconstruct" / "sigma_rel-0.1" / "unet" / "diffusion_pytorch_model.safetensors"
        assert set(load_file(rebuilt)) == set(exported)

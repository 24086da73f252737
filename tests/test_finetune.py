"""Fine-tuning pretrained UNets: from a pipeline in diffusers' example layout, from a bare UNet folder, with frozen
parts, with LoRA adapters (merged export and adapter), and adding class conditioning without changing the start."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file

from flowers_ddpm.cli import main
from flowers_ddpm.config.loading import FINETUNE_LEARNING_RATE, build_config
from flowers_ddpm.errors import UserError
from flowers_ddpm.models.finetune import add_class_conditioning, load_for_finetuning
from flowers_ddpm.models.unet import build_noise_scheduler, build_unet
from flowers_ddpm.objectives.diffusion import DiffusionObjective

from .conftest import tiny_train_args


@pytest.fixture(scope="module")
def example_pipeline(tmp_path_factory):
    """A pipeline as diffusers' train_unconditional.py writes it (unet/, scheduler/, model_index.json; .bin weights),
    with a noise schedule that differs from our defaults."""
    from diffusers import DDPMPipeline

    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("pretrained") / "ddpm-example"
    scheduler = build_noise_scheduler(500, "squaredcos_cap_v2", "epsilon")
    DDPMPipeline(unet=build_unet("tiny", 16), scheduler=scheduler).save_pretrained(str(path), safe_serialization=False)
    assert (path / "unet" / "diffusion_pytorch_model.bin").is_file()
    return path


def pretrained_unet(path):
    from diffusers import UNet2DModel

    return UNet2DModel.from_pretrained(str(path), subfolder="unet")


def finetune_config(data, out, **overrides):
    args, values = tiny_train_args(data, out, **overrides), {}
    while args:  # --key value, --flag (True) or --no-flag (False)
        flag, args = args[0][2:], args[1:]
        if args and not args[0].startswith("--"):
            values[flag], args = args[0], args[1:]
        else:
            values[flag.removeprefix("no-")] = not flag.startswith("no-")
    values.pop("config")
    return build_config({"model_preset": "tiny"}, values)


def test_starts_from_the_pretrained_pipeline_and_trains_only_the_chosen_parts(example_pipeline, image_folder,
                                                                              tmp_path, caplog):
    # same weights and noise schedule as the pretrained model, so the loss on a batch is the pretrained loss
    cfg = finetune_config(image_folder, tmp_path / "x", init_from=str(example_pipeline))
    assert cfg.optim.learning_rate == FINETUNE_LEARNING_RATE  # lower default when fine-tuning
    unet, scheduler = load_for_finetuning(cfg.finetune.init_from, cfg.data.resolution, cfg.model)
    assert scheduler.config.num_train_timesteps == 500 and scheduler.config.beta_schedule == "squaredcos_cap_v2"
    batch = {"pixel_values": torch.rand(4, 3, 16, 16) * 2 - 1}
    losses = []
    for model in (unet, pretrained_unet(example_pipeline)):
        torch.manual_seed(0)
        losses.append(DiffusionObjective(scheduler)(model, batch).item())
    assert losses[0] == losses[1]

    # end to end at another resolution, training only the decoder half
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="flowers_ddpm"):
        assert main(["train", *tiny_train_args(image_folder, out, init_from=str(example_pipeline), resolution=24,
                                               train_only="up_blocks,conv_out", learning_rate=0.01, max_train_steps=2,
                                               checkpointing_steps=2, use_ema=False, save_images_steps=100)]) == 0
    assert "pretrained at 16 px at 24 px" in caplog.text
    before = pretrained_unet(example_pipeline).state_dict()
    after = pretrained_unet(out / "pipeline")
    assert after.config.sample_size == 24
    after = after.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("up_blocks.", "conv_out.")) for k in changed)
    assert any(k.startswith("up_blocks.") for k in changed)
    exported_scheduler = (out / "pipeline" / "scheduler" / "scheduler_config.json").read_text()
    assert '"squaredcos_cap_v2"' in exported_scheduler and '"num_train_timesteps": 500' in exported_scheduler


def test_starts_from_a_bare_unet_folder_with_the_configured_schedule(tmp_path, image_folder):
    torch.manual_seed(2)
    unet = build_unet("tiny", 16)
    unet.save_pretrained(str(tmp_path / "bare-unet"))
    cfg = finetune_config(image_folder, tmp_path / "x", init_from=str(tmp_path / "bare-unet"), ddpm_num_steps=300)
    loaded, scheduler = load_for_finetuning(cfg.finetune.init_from, cfg.data.resolution, cfg.model)
    assert all(torch.equal(a, b) for a, b in zip(unet.state_dict().values(), loaded.state_dict().values()))
    assert scheduler.config.num_train_timesteps == 300


@pytest.mark.parametrize("flags, message", [
    (dict(init_from="does/not/exist/here"), "init_from does/not/exist/here does not exist"),
    (dict(lora_rank=4), "lora_rank needs init_from"),
    (dict(init_from="someone/missing-model"), "cannot reach init_from someone/missing-model"),
    (dict(init_from="PRETRAINED", resolution=15), "resolution must be divisible by 2"),
    (dict(init_from="PRETRAINED", train_only="up_blocks,decoder"), "train_only names unknown UNet parts decoder"),
])
def test_fine_tuning_mistakes_are_user_errors(example_pipeline, image_folder, tmp_path, capsys, flags, message):
    if flags.get("init_from") == "PRETRAINED":
        flags["init_from"] = str(example_pipeline)
    assert main(["train", *tiny_train_args(image_folder, tmp_path / "run", **flags)]) == 2
    assert message in capsys.readouterr().err


def test_lora_trains_only_adapters_and_exports_a_merged_pipeline(example_pipeline, image_folder, tmp_path, caplog):
    from diffusers import DDPMPipeline, DiffusionPipeline
    from peft import PeftModel

    out, resumed = tmp_path / "lora", tmp_path / "resumed"
    flags = dict(init_from=str(example_pipeline), lora_rank=4, learning_rate=0.01, max_train_steps=2,
                 checkpointing_steps=1, use_ema=False)
    with caplog.at_level(logging.INFO, logger="flowers_ddpm"):
        assert main(["train", *tiny_train_args(image_folder, out, **flags)]) == 0
    assert "47,232 of 749,731 parameters train" in caplog.text  # rank-4 adapters of the tiny UNet

    # resuming from a LoRA checkpoint continues the same run
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(out / "checkpoints" / "checkpoint-1", resumed / "checkpoints" / "checkpoint-1")
    assert main(["train", *tiny_train_args(image_folder, resumed, resume_from_checkpoint="latest", **flags)]) == 0
    straight = load_file(out / "checkpoints" / "checkpoint-2" / "model.safetensors")
    again = load_file(resumed / "checkpoints" / "checkpoint-2" / "model.safetensors")
    assert all(torch.equal(straight[k], again[k]) for k in straight)

    # only the adapter weights moved (the checkpoint holds the peft-wrapped model)
    before = pretrained_unet(example_pipeline).state_dict()
    trained = load_file(out / "checkpoints" / "checkpoint-2" / "model.safetensors")
    adapters = {k: v for k, v in trained.items() if ".lora_" in k}
    assert adapters and any(k.endswith("lora_B.default.weight") and v.abs().sum() > 0 for k, v in adapters.items())
    for key, value in trained.items():
        if ".lora_" not in key:
            base_key = key.replace("base_model.model.", "").replace(".base_layer", "")
            assert torch.equal(value, before[base_key]), key

    # the export is a plain pipeline whose UNet equals pretrained UNet + adapter
    pipe = DiffusionPipeline.from_pretrained(str(out / "pipeline"))
    assert type(pipe) is DDPMPipeline and type(pipe.unet).__name__ == "UNet2DModel"
    assert {"adapter_model.safetensors", "adapter_config.json"} <= {
        p.name for p in (out / "pipeline" / "lora_adapter").iterdir()}
    with_adapter = PeftModel.from_pretrained(pretrained_unet(example_pipeline), str(out / "pipeline" / "lora_adapter"))
    x, t = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 400])
    with torch.no_grad():
        merged_out, adapter_out = pipe.unet(x, t).sample, with_adapter(x, t).sample
        base_out = pretrained_unet(example_pipeline)(x, t).sample
    torch.testing.assert_close(merged_out, adapter_out, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(merged_out, base_out, atol=1e-4)  # the adapter did change the model


def test_added_class_embedding_starts_at_zero(example_pipeline):
    unet = pretrained_unet(example_pipeline)
    conditioned = add_class_conditioning(unet, num_class_embeds=5)
    assert conditioned.config.num_class_embeds == 5 and conditioned.class_embedding.weight.requires_grad
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([5, 50, 500])
    with torch.no_grad():
        expected = unet(x, t).sample
        for labels in ([0, 1, 2], [4, 4, 3]):
            torch.testing.assert_close(conditioned(x, t, class_labels=torch.tensor(labels)).sample, expected)
    with pytest.raises(UserError, match="has 5 classes"):
        add_class_conditioning(conditioned, num_class_embeds=7)

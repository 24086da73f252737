"""Fine-tuning a pretrained UNet: load it (and its noise schedule), adapt its resolution and classes, choose what
trains (all weights, some parts, or LoRA adapters through peft), and turn the result back into a plain UNet.

A pretrained model is any diffusers pipeline folder or Hub repo with a `unet/` subfolder (our exports, diffusers'
unconditional example output, `google/ddpm-*`), or a bare `UNet2DModel` folder.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Optional

import torch
from diffusers import DDPMScheduler, UNet2DModel
from huggingface_hub import file_exists
from peft import LoraConfig, PeftModel, get_peft_model

from .._util.hub_ids import is_hub_id
from ..config.sections import FinetuneSettings, ModelSettings
from ..errors import UserError
from .unet import build_noise_scheduler

logger = logging.getLogger(__name__)
ADAPTER_DIR = "lora_adapter"  # inside the exported pipeline folder


def _unet_location(init_from: str) -> tuple[str, Optional[str]]:
    """(path or repo id, subfolder) of the UNet weights inside `init_from`."""
    local = Path(init_from)
    if local.is_dir():
        if (local / "unet" / "config.json").is_file():
            return init_from, "unet"
        if (local / "config.json").is_file():
            return init_from, None
        raise UserError(f"init_from {init_from} is neither a pipeline folder (with unet/) nor a UNet2DModel folder")
    if not is_hub_id(init_from):
        raise UserError(f"init_from {init_from} does not exist")

    try:  # a Hub id: a pipeline repo has unet/config.json, a bare UNet repo has config.json at its root
        return init_from, ("unet" if file_exists(init_from, "unet/config.json") else None)
    except Exception as e:  # offline, unknown repo, no access: all one sentence for the user
        raise UserError(f"cannot reach init_from {init_from} on the Hub: {str(e).splitlines()[0]}") from None


def load_pretrained_unet(init_from: str, resolution: int):
    """The pretrained UNet2DModel of `init_from`, set to train at `resolution`."""
    path, subfolder = _unet_location(init_from)
    try:
        unet = UNet2DModel.from_pretrained(path, subfolder=subfolder)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a UNet2DModel from init_from {init_from}: {str(e).splitlines()[0]}") from None
    factor = 2 ** (len(unet.config.down_block_types) - 1)
    if resolution % factor:
        # the skip connections would not line up: fail now rather than in the first forward pass
        raise UserError(f"resolution must be divisible by {factor} (the downsampling factor of the UNet in "
                        f"{init_from}); got {resolution}")
    if unet.config.sample_size != resolution:
        logger.warning("fine-tuning a UNet pretrained at %s px at %d px (convolutional, so it runs; quality needs "
                       "training at the new size)", unet.config.sample_size, resolution)
        unet.register_to_config(sample_size=resolution)
    return unet


def load_pretrained_scheduler(init_from: str):
    """The DDPMScheduler of a pretrained pipeline (same betas and prediction type), or None for a bare UNet."""
    path, subfolder = _unet_location(init_from)
    if subfolder is None:
        return None
    try:
        config = DDPMScheduler.load_config(path, subfolder="scheduler")
    except (OSError, ValueError):
        return None
    # pipelines may ship a DDIM or other scheduler; its betas and prediction type are what the UNet learnt
    return DDPMScheduler.from_config(config)


def add_class_conditioning(unet, num_class_embeds: int):
    """A copy of an unconditional UNet2DModel with a class embedding initialised to zero, so it starts out computing
    exactly what the pretrained model computes for every class."""
    if unet.config.num_class_embeds is not None:
        if unet.config.num_class_embeds != num_class_embeds:
            raise UserError(f"the pretrained UNet has {unet.config.num_class_embeds} classes, not {num_class_embeds}")
        return unet
    conditioned = UNet2DModel.from_config({**unet.config, "num_class_embeds": num_class_embeds})
    missing, unexpected = conditioned.load_state_dict(unet.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("class_embedding.") for k in missing), (missing, unexpected)
    torch.nn.init.zeros_(conditioned.class_embedding.weight)  # added to the time embedding: zero = no change
    return conditioned


def apply_lora(unet, rank: int, alpha: Optional[float], target_modules: str):
    """Wrap the UNet in a peft model with LoRA adapters on `target_modules`; only the adapters train."""
    targets = [name.strip() for name in target_modules.split(",") if name.strip()]
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, target_modules=targets,
                        init_lora_weights="gaussian")
    try:
        model = get_peft_model(unet, config)
    except ValueError as e:  # no module matched
        raise UserError(f"lora_target_modules {target_modules!r}: {str(e).splitlines()[0]}") from None
    return model


def freeze_except(unet, parts: str) -> None:
    """Freeze every parameter except those under the named top-level parts (e.g. 'up_blocks,mid_block')."""
    names = [p.strip() for p in parts.split(",") if p.strip()]
    children = dict(unet.named_children())
    unknown = [n for n in names if n not in children]
    if unknown:
        raise UserError(f"train_only names unknown UNet parts {', '.join(unknown)}; allowed: {', '.join(children)}")
    unet.requires_grad_(False)
    for name in names:
        children[name].requires_grad_(True)
        for module in children[name].modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.register_forward_pre_hook(_contiguous_frozen_input)


def _contiguous_frozen_input(module, args):
    # Works around a crash in PyTorch 2.13's CPU GroupNorm backward (segfault) when a channels-last input does not
    # require grad but the norm's weight does, which is the case at the boundary between frozen and trained parts.
    x = args[0]
    if not x.requires_grad and not x.is_contiguous():
        return (x.contiguous(), *args[1:])
    return None


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    """The parameters the optimizer updates (frozen ones left out)."""
    return [p for p in model.parameters() if p.requires_grad]


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    return sum(p.numel() for p in trainable_parameters(model)), sum(p.numel() for p in model.parameters())


def is_lora(model) -> bool:
    """Whether the model is a peft-wrapped UNet with LoRA adapters."""
    return isinstance(model, PeftModel)


def sampling_unet(model):
    """A UNet2DModel that diffusers pipelines accept: the peft-wrapped UNet (adapters active) or the model itself."""
    return model.get_base_model() if is_lora(model) else model


def merged_unet(model):
    """A plain UNet2DModel with LoRA adapters merged into its weights (the model itself when not LoRA)."""
    if not is_lora(model):
        return model
    return copy.deepcopy(model).merge_and_unload()


def save_adapter(model, folder: str | Path, base_model: Optional[str] = None) -> Optional[Path]:
    """Write the LoRA adapter (adapter_model.safetensors + adapter_config.json) into `folder`; None when not LoRA."""
    if not is_lora(model):
        return None
    folder = Path(folder)
    if base_model is not None:
        model.peft_config["default"].base_model_name_or_path = base_model
    model.save_pretrained(str(folder), safe_serialization=True, save_embedding_layers=False)
    (folder / "README.md").unlink(missing_ok=True)  # peft's placeholder card; the pipeline's card describes it
    return folder


def load_for_finetuning(init_from: str, resolution: int, model: ModelSettings):
    """(UNet, noise scheduler) for --init_from: the pretrained weights and, from a pipeline, its noise schedule
    (else the one `model` describes)."""
    unet = load_pretrained_unet(init_from, resolution)
    scheduler = load_pretrained_scheduler(init_from)
    if scheduler is None:
        scheduler = build_noise_scheduler(model.ddpm_num_steps, model.ddpm_beta_schedule, model.prediction_type)
    else:
        logger.info("noise schedule from %s: %d steps, %s betas, predicts %s", init_from,
                    scheduler.config.num_train_timesteps, scheduler.config.beta_schedule,
                    scheduler.config.prediction_type)
    return unet, scheduler


def select_trainable(model, finetune: FinetuneSettings):
    """Apply --lora_rank or --train_only; returns the model to train (peft-wrapped for LoRA)."""
    if finetune.lora_rank is not None:
        model = apply_lora(model, finetune.lora_rank, finetune.lora_alpha, finetune.lora_target_modules)
    elif finetune.train_only:
        freeze_except(model, finetune.train_only)
    trainable, total = count_parameters(model)
    logger.info("%s of %s parameters train (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / max(total, 1))
    return model

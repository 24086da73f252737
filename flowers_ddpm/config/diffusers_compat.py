"""How `flowers-ddpm train` relates to diffusers' `examples/unconditional_image_generation/train_unconditional.py`:
every flag of that script is accepted with the same meaning; where our default differs, this table says why, the
run names each difference that applies to it in one line at start, and docs/diffusers-compatibility.md is made
from it (a test keeps that page in step)."""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

from .sections import FIELDS, TrainConfig


class Flag(NamedTuple):
    diffusers_default: Any
    why: Optional[str] = None  # None: same default and meaning


_SAME = Flag(None)
# The example's flags (diffusers 0.30-0.36) with its defaults; `why` is set where our default differs.
DIFFUSERS_FLAGS: dict[str, Flag] = {
    "dataset_name": Flag(None, "Flowers102 is the default data set; the example needs --dataset_name or "
                               "--train_data_dir"),
    "dataset_config_name": _SAME,
    "model_config_name_or_path": _SAME,
    "train_data_dir": _SAME,
    "output_dir": Flag("ddpm-model-64", "named after the default data set"),
    "overwrite_output_dir": _SAME,
    "cache_dir": _SAME,
    "resolution": _SAME,
    "center_crop": _SAME,
    "random_flip": _SAME,
    "train_batch_size": _SAME,
    "eval_batch_size": _SAME,
    "dataloader_num_workers": Flag(0, None),
    "num_epochs": Flag(100, None),
    "save_images_epochs": Flag(10, "sample grids every --save_images_steps (1000) unless epochs are given"),
    "save_model_epochs": Flag(10, "the pipeline is exported at the end and every --save_model_steps; epochs when "
                                  "given"),
    "gradient_accumulation_steps": _SAME,
    "learning_rate": _SAME,
    "lr_scheduler": _SAME,
    "lr_warmup_steps": _SAME,
    "adam_beta1": _SAME,
    "adam_beta2": _SAME,
    "adam_weight_decay": _SAME,
    "adam_epsilon": _SAME,
    "use_ema": Flag(False, "EMA weights give better samples for the same training; --no-use_ema turns it off"),
    "ema_inv_gamma": _SAME,
    "ema_power": _SAME,
    "ema_max_decay": _SAME,
    "push_to_hub": _SAME,
    "hub_token": _SAME,
    "hub_model_id": _SAME,
    "hub_private_repo": _SAME,
    "logger": _SAME,
    "logging_dir": _SAME,
    "local_rank": _SAME,
    "mixed_precision": Flag("no", "auto: a few timed steps at start pick bf16 (or fp16 on CUDA) where it is >= 10% "
                                  "faster than fp32 on this machine and model, else fp32 (no); under `accelerate "
                                  "launch` the launcher's precision; `config` = accelerate's config"),
    "prediction_type": _SAME,
    "ddpm_num_steps": _SAME,
    "ddpm_num_inference_steps": Flag(1000, "sample grids use DDIM with 50 steps (--sample_scheduler): the same "
                                           "model, 20 times faster grids"),
    "ddpm_beta_schedule": _SAME,
    "checkpointing_steps": _SAME,
    "checkpoints_total_limit": _SAME,
    "resume_from_checkpoint": _SAME,
    "enable_xformers_memory_efficient_attention": _SAME,
}
# Our settings with no counterpart there whose default changes what a diffusers command line does.
EXTRA_DIFFERENCES: dict[str, Flag] = {
    "dataset_split": Flag("train", "a Hub data set is trained on all its splits ('all'); Flowers102's train split "
                                   "alone has 1,020 of its 8,189 images"),
    "sample_scheduler": Flag("ddpm", "see ddpm_num_inference_steps"),
}


def run_differences(cfg: TrainConfig) -> list[str]:
    """'name=ours (diffusers: theirs)' for each differing default that this run uses (the user did not set it)."""
    notes = []
    for name, flag in {**DIFFUSERS_FLAGS, **EXTRA_DIFFERENCES}.items():
        if flag.why is None or name in cfg.explicit:
            continue
        if name == "dataset_name" and cfg.data.train_data_dir:
            continue  # a local folder is used; the data set default does not apply
        if name == "dataset_split" and cfg.data.train_data_dir:
            continue  # a local folder has one split
        if name in ("save_images_epochs", "save_model_epochs"):
            steps = cfg.get(name.replace("_epochs", "_steps"))
            ours = f"every {steps} steps" if steps else "at the end only"
        else:
            ours = cfg.get(name)
        notes.append(f"{name}={ours} (diffusers: {flag.diffusers_default})")
    return notes


def compatibility_table() -> str:
    """docs/diffusers-compatibility.md: every flag of the example, same or differs and why."""
    lines = ["# Coming from diffusers' `train_unconditional.py`", "",
             "`flowers-ddpm train` accepts every flag of diffusers' "
             "`examples/unconditional_image_generation/train_unconditional.py` with the same meaning, so an existing "
             "command line works after swapping the program name (`accelerate launch train_unconditional.py ARGS` -> "
             "`accelerate launch -m flowers_ddpm train ARGS`). Where our default differs, a run that relies on it "
             "names the difference in one line at start. This page is generated from "
             "`flowers_ddpm/config/diffusers_compat.py` (a test fails when it is stale).", "",
             "| flag | diffusers' default | ours | same / differs: why |", "| --- | --- | --- | --- |"]
    for name, flag in {**DIFFUSERS_FLAGS, **EXTRA_DIFFERENCES}.items():
        ours = FIELDS[name].default
        verdict = "same" if flag.why is None else f"differs: {flag.why}"
        if name in EXTRA_DIFFERENCES:
            verdict += " (not a flag of the example)"
        lines.append(f"| `--{name}` | `{flag.diffusers_default}` | `{ours}` | {verdict} |")
    lines += ["", "Also accepted: `--report_to` (the newer examples' name for `--logger`), every beta schedule of "
              "`DDPMScheduler` and every learning-rate schedule of `diffusers.optimization.get_scheduler` "
              "(`piecewise_constant` takes its rules from `--lr_step_rules`). `--hub_token` is used for the push "
              "only and never written to any file; with `--logger wandb` it is refused, as diffusers does.", ""]
    return "\n".join(lines)

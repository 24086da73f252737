"""Named training recipes: tuned defaults applied under the user's YAML and flags (`--recipe small-data`,
`--recipe small-data-photos`).

The values come from the recipe ablation (`scripts/recipe_ablation.py`, results and reasoning in docs/recipes.md).
Nothing here depends on the data the ablation ran on; the learning rate depends on the model size, because the
ablation's small UNet tolerates a higher rate than the 114M `ddpm` or the ADM UNet.
"""

from __future__ import annotations

from typing import Optional

# Settings shared by every model size.
SMALL_DATA = {
    "lr_scheduler": "cosine",
    "lr_warmup_steps": 100,
    "use_ema": True,
    "ema_power": 2 / 3,
    "ema_max_decay": 0.999,
    "prediction_type": "v_prediction",
    "snr_gamma": None,  # Min-SNR-5 was slower here (docs/recipes.md, screen): plain MSE on v
    # Linear beat cosine at equal compute in the screen and in the 10-minute run (docs/recipes.md); it is also the
    # schedule of DDPM and of diffusers' 64x64 Flowers example.
    "ddpm_beta_schedule": "linear",
}

# Peak learning rate and batch size by model preset. Measured for the CPU-sized UNets (`tiny`, `small`): at a
# fixed number of training images, batch 8 learned much faster than 16 or 32 (more optimizer steps) at the same
# images/s on a CPU. The large UNets keep diffusers' batch 16 (a GPU is not faster per image at batch 8) and get
# the learning rates published for models of their size (DDPM: 2e-4, ADM: 1e-4); see docs/recipes.md.
SMALL_DATA_BY_PRESET = {
    "tiny": {"learning_rate": 1e-3, "train_batch_size": 8},
    "small": {"learning_rate": 1e-3, "train_batch_size": 8},
    "ddpm": {"learning_rate": 2e-4, "train_batch_size": 16},
    "adm": {"learning_rate": 1e-4, "train_batch_size": 16},
}

# What `small-data-photos` changes for natural photographs (issue 16; docs/recipes.md, the cifar10-5k screens and
# finals): Adam betas (0.9, 0.99) as EDM2 uses, Improved DDPM's cosine noise schedule, and ADM's scale-shift time
# conditioning (a UNet setting: merged under the user's own `unet_config`). Each lowered the Frechet ratio on
# CIFAR-10 photographs at equal compute; on scikit-learn's 8x8 digits the first two lost class accuracy, which is
# why `small-data` keeps DDPM's betas and linear schedule.
PHOTOS = {
    "adam_beta1": 0.9,
    "adam_beta2": 0.99,
    "ddpm_beta_schedule": "squaredcos_cap_v2",
    "unet_config": {"resnet_time_scale_shift": "scale_shift"},
}

# ... and for class-conditional photograph runs: classifier-free guidance only at noise levels sigma <= 4.5
# (Kynkaanniemi et al. 2024), the plain conditional model above. On cifar10-5k at 10 CPU-minutes it lowered the
# Frechet ratio by 17-19% for a few points of class accuracy (docs/recipes.md, tenth session). Written into the
# sample grids' settings and so into every exported pipeline's default (docs/sampling.md).
PHOTOS_CLASS_CONDITIONAL = {"sample_guidance_interval": [0.0, 4.5]}

# ... and for unconditional photograph runs: loss weights per noise level learned during training (EDM2's
# uncertainty weighting). On cifar10-5k at 10 CPU-minutes it lowered the Frechet ratio on each of four training
# seeds, by 11% on their mean, and narrowed their spread from 25% to 7% (docs/recipes.md, fourteenth session).
PHOTOS_UNCONDITIONAL = {"learned_loss_weights": True}

RECIPES = ("small-data", "small-data-photos")


def recipe_settings(name: str, model_preset: Optional[str], class_conditional: bool = False) -> dict:
    """The settings of recipe `name` for a model preset (unknown presets get the `adm` settings, the most careful)
    and a class-conditional or unconditional run."""
    if name not in RECIPES:
        raise KeyError(name)
    settings = {**SMALL_DATA, **SMALL_DATA_BY_PRESET.get(model_preset or "ddpm", SMALL_DATA_BY_PRESET["adm"])}
    if name == "small-data-photos":
        settings.update(PHOTOS, **(PHOTOS_CLASS_CONDITIONAL if class_conditional else PHOTOS_UNCONDITIONAL))
    return settings

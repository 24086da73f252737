"""Named training recipes: tuned defaults applied under the user's YAML and flags (`--recipe small-data`).

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

RECIPES = ("small-data",)


def recipe_settings(name: str, model_preset: Optional[str]) -> dict:
    """The settings of recipe `name` for a model preset (unknown presets get the `adm` settings, the most careful)."""
    if name != "small-data":
        raise KeyError(name)
    return {**SMALL_DATA, **SMALL_DATA_BY_PRESET.get(model_preset or "ddpm", SMALL_DATA_BY_PRESET["adm"])}

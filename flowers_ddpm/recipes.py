"""Named training recipes: tuned defaults applied under the user's YAML and flags (`--recipe small-data`).

The values come from the recipe ablation (`scripts/recipe_ablation.py`, results and reasoning in RECIPES.md).
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
    "snr_gamma": 5.0,
    "ddpm_beta_schedule": "squaredcos_cap_v2",
    "train_batch_size": 32,
}

# Peak learning rate by model preset (see RECIPES.md: measured for `tiny`, scaled down for the larger UNets).
SMALL_DATA_LEARNING_RATE = {"tiny": 1e-3, "small": 1e-3, "ddpm": 2e-4, "adm": 1e-4}

RECIPES = ("small-data",)


def recipe_settings(name: str, model_preset: Optional[str]) -> dict:
    """The settings of recipe `name` for a model preset (unknown presets get the smallest learning rate)."""
    if name != "small-data":
        raise KeyError(name)
    rate = SMALL_DATA_LEARNING_RATE.get(model_preset or "ddpm", min(SMALL_DATA_LEARNING_RATE.values()))
    return {**SMALL_DATA, "learning_rate": rate}

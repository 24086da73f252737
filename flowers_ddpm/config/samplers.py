"""Sampler names by model family and the sampler used where none is chosen, in one place without imports: the
config (flag choices, the training grids' default) and the sampling code (`sample`, `evaluate`, the demo, through
sampling.default_sampler) share them. Why these defaults: docs/sampling.md."""

# for models trained with --objective ddpm; sde-dpmsolver++ is DPM-Solver++ with fresh noise at every step
DDPM_SAMPLERS = ("ddpm", "ddim", "dpmsolver++", "sde-dpmsolver++")
EDM_SAMPLERS = ("edm-dpmsolver++", "edm-sde-dpmsolver++", "edm-euler")  # for models trained with --objective edm
SAMPLE_SCHEDULERS = DDPM_SAMPLERS + EDM_SAMPLERS
DEFAULT_SAMPLERS = {"ddpm": "ddim", "edm": "edm-dpmsolver++"}  # family (objective) -> default sampler
# Classifier-free guidance where none is given: the training grids and what a class-conditional export saves as
# its default (sample, evaluate, the demo and a plain diffusers call use it). Best or tied on both beds.
DEFAULT_GUIDANCE_SCALE = 1.5

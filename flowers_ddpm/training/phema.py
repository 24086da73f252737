"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", EDM2).

During training two power-function EMA profiles (relative standard deviations `sigma_rel`, e.g. 0.05 and 0.10) are
kept beside the model; every `phema_snapshot_steps` optimizer steps both are written to
`<output_dir>/phema/step-<step>.safetensors`. After training, `reconstruct` synthesises the EMA of any other
`sigma_rel` as the least-squares combination of the snapshots (EDM2's `solve_posthoc_ema`), and
`ema-reconstruct` exports a pipeline for each. The running profiles are saved in every checkpoint (`phema.safetensors`),
so a resumed run writes the same snapshots as an uninterrupted one.

The math follows EDM2's `training/phema.py`: a profile of exponent gamma averages the weights at steps tau <= t with
weight proportional to tau^gamma, i.e. beta_t = (1 - 1/t)^(gamma + 1); sigma_rel and gamma are related by
sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..errors import UserError

PHEMA_DIR = "phema"
_SNAPSHOT = re.compile(r"step-(\d+)\.safetensors$")


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The power-function exponent gamma of a relative standard deviation (the largest real root of
    gamma^3 + 7 gamma^2 + (16 - s^-2) gamma + (12 - s^-2) = 0)."""
    t = float(sigma_rel) ** -2
    return float(np.roots([1, 7, 16 - t, 12 - t]).real.max())


def power_function_beta(sigma_rel: float, step: int) -> float:
    """The EMA decay at optimizer step `step` (1-based) of the profile `sigma_rel`."""
    return (1 - 1 / step) ** (sigma_rel_to_gamma(sigma_rel) + 1)


def _p_dot_p(t_a, gamma_a, t_b, gamma_b):
    """Inner products of the normalised power-function profiles ending at t_a and t_b (EDM2, Eq. in App. C)."""
    t_ratio = t_a / t_b
    t_exp = np.where(t_a < t_b, gamma_b, -gamma_a)
    t_max = np.maximum(t_a, t_b)
    num = (gamma_a + 1) * (gamma_b + 1) * t_ratio**t_exp
    den = (gamma_a + gamma_b + 1) * t_max
    return num / den


def solve_coefficients(in_steps: Sequence[float], in_sigma_rel: Sequence[float], out_step: float,
                       out_sigma_rel: float) -> np.ndarray:
    """Weights of the stored snapshots (step, sigma_rel) whose combination best matches the profile
    (out_step, out_sigma_rel) in the least-squares sense."""
    in_t = np.asarray(in_steps, dtype=np.float64)
    in_g = np.array([sigma_rel_to_gamma(s) for s in in_sigma_rel])
    a = _p_dot_p(in_t[:, None], in_g[:, None], in_t[None, :], in_g[None, :])
    b = _p_dot_p(in_t[:, None], in_g[:, None], np.float64(out_step), sigma_rel_to_gamma(out_sigma_rel))
    return np.linalg.lstsq(a, b, rcond=None)[0].reshape(-1)


def parse_sigma_rels(text: str | None) -> tuple[float, ...]:
    """'0.05,0.1' -> (0.05, 0.1) (validated with the config: config/validation.py `validate_phema`)."""
    return tuple(float(v) for v in text.split(",")) if text else ()


def check_sigma_rels(values: Sequence[float], flag: str = "--sigma_rel") -> None:
    """EMA lengths to reconstruct: at least one, each in (0, 0.28) (the power function's range)."""
    if not values or not all(0 < v < 0.28 for v in values):
        raise UserError(f"{flag} values must lie in (0, 0.28); got {list(values) if values else values}")


class PowerFunctionEMA:
    """The running power-function EMA profiles of a model's parameters (float32 copies on the model's device)."""

    def __init__(self, named_parameters: Iterable[tuple[str, torch.Tensor]], sigma_rels: Sequence[float]):
        self.sigma_rels = tuple(sigma_rels)
        self.names, params = zip(*[(n, p) for n, p in named_parameters])
        self.profiles = [[p.detach().float().clone() for p in params] for _ in self.sigma_rels]

    @torch.no_grad()
    def update(self, parameters: Iterable[torch.Tensor], step: int) -> None:
        """Average in the weights after optimizer step `step` (1-based; step 1 copies them)."""
        params = [p.detach().float() for p in parameters]
        for sigma_rel, profile in zip(self.sigma_rels, self.profiles):
            beta = power_function_beta(sigma_rel, step)
            torch._foreach_lerp_(profile, params, 1 - beta)

    def tensors(self) -> dict[str, torch.Tensor]:
        """All profiles as one flat dict: '<sigma_rel>/<parameter name>' -> CPU tensor."""
        return {f"{s:g}/{n}": p.cpu().contiguous() for s, profile in zip(self.sigma_rels, self.profiles)
                for n, p in zip(self.names, profile)}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for s, profile in zip(self.sigma_rels, self.profiles):
            for n, p in zip(self.names, profile):
                p.copy_(tensors[f"{s:g}/{n}"])

    def save_snapshot(self, output_dir: Path, step: int) -> Path:
        path = Path(output_dir) / PHEMA_DIR / f"step-{step:07d}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file(self.tensors(), str(tmp), metadata={"step": str(step)})
        tmp.replace(path)
        return path


def read_snapshots(run_dir: Path) -> list[tuple[int, float, dict[str, torch.Tensor]]]:
    """(step, sigma_rel, {parameter name: tensor}) for every profile of every snapshot of a run."""
    folder = Path(run_dir) / PHEMA_DIR
    files = sorted(p for p in folder.glob("step-*.safetensors") if _SNAPSHOT.search(p.name)) if folder.is_dir() else []
    if not files:
        raise UserError(f"{run_dir} has no post-hoc EMA snapshots ({folder}); train with --phema_sigma_rel 0.05,0.1")
    snapshots = []
    for path in files:
        step = int(_SNAPSHOT.search(path.name).group(1))
        by_profile: dict[float, dict[str, torch.Tensor]] = {}
        for key, tensor in load_file(str(path)).items():
            sigma, name = key.split("/", 1)
            by_profile.setdefault(float(sigma), {})[name] = tensor
        snapshots += [(step, sigma, weights) for sigma, weights in sorted(by_profile.items())]
    return snapshots


def reconstruct(snapshots, sigma_rel: float, step: int | None = None) -> dict[str, torch.Tensor]:
    """The EMA weights of profile `sigma_rel` at `step` (default: the last snapshot's) from the snapshots."""
    usable = [s for s in snapshots if step is None or s[0] <= step]
    step = max(s[0] for s in usable) if step is None else step
    coefficients = solve_coefficients([s[0] for s in usable], [s[1] for s in usable], step, sigma_rel)
    names = usable[0][2].keys()
    return {n: sum(float(c) * s[2][n].double() for c, s in zip(coefficients, usable)).float() for n in names}


def reconstruction_folder(run_dir: str | Path, sigma_rel: float, output_dir: str | Path | None = None) -> Path:
    """Where `export_reconstructions` writes the pipeline of one EMA length."""
    return (Path(output_dir) if output_dir else Path(run_dir) / "ema-reconstruct") / f"sigma_rel-{sigma_rel:g}"


def export_reconstructions(run_dir: str | Path, sigma_rels: Sequence[float], output_dir: str | Path | None = None
                           ) -> list[Path]:
    """For each sigma_rel, the run's exported pipeline with the reconstructed EMA weights in its UNet, written to
    `<output_dir>/sigma_rel-<value>/` (default output_dir: `<run_dir>/ema-reconstruct`)."""
    from ..pipelines.export import TRAINING_CONFIG_NAME, save_pipeline
    from ..pipelines.sampling import load_pipeline

    run_dir = Path(run_dir)
    source = run_dir / "pipeline"
    if not (source / "model_index.json").is_file():
        raise UserError(f"{run_dir} has no exported pipeline ({source}); pass a training --output_dir")
    snapshots = read_snapshots(run_dir)
    written = []
    for sigma_rel in sigma_rels:
        pipe = load_pipeline(str(source), torch.device("cpu"))
        weights = reconstruct(snapshots, sigma_rel)
        params = dict(pipe.unet.named_parameters())
        with torch.no_grad():
            for name, tensor in weights.items():
                if name in params:  # training-only weights (the --augment_p conditioning) are not exported
                    params[name].copy_(tensor)

        def copy_config(folder: Path) -> None:
            config = source / TRAINING_CONFIG_NAME
            if config.is_file():
                (folder / TRAINING_CONFIG_NAME).write_bytes(config.read_bytes())

        written.append(save_pipeline(pipe, reconstruction_folder(run_dir, sigma_rel, output_dir), copy_config))
    return written


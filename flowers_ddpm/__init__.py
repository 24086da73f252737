"""flowers_ddpm: train, fine-tune and publish pixel-space diffusion models with diffusers."""

__version__ = "0.1.0"

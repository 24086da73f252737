"""A small, real feature network for offline tests (`--feature_network tests.feature_nets:tiny_conv_net`)."""

from __future__ import annotations

import torch
from torch import nn


class TinyConvNet(nn.Module):
    """Two random-initialised conv layers on 32x32 inputs: 64-d features (mean + max pooled) and 10 logits."""

    name = "tiny-conv-net"

    def __init__(self):
        super().__init__()
        self.convs = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
                                   nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Linear(64, 10)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict:
        x = nn.functional.interpolate(images.float() / 255.0, size=(32, 32), mode="bilinear", antialias=True)
        x = self.convs(x)
        features = torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)
        return {"features": features, "logits": self.head(features)}


def tiny_conv_net() -> TinyConvNet:
    """The same weights on every call and in every process."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return TinyConvNet()


class GradTrackingNet(TinyConvNet):
    """TinyConvNet as a user might write one: no `torch.no_grad` of its own, parameters that require grad."""

    def forward(self, images: torch.Tensor) -> dict:
        return TinyConvNet.forward.__wrapped__(self, images)


def grad_tracking_net() -> GradTrackingNet:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return GradTrackingNet()


def interrupting_net() -> TinyConvNet:
    """`tiny_conv_net` that sends its own process SIGINT when first used and FLOWERS_TEST_INTERRUPT is set (a Ctrl-C
    during evaluation, at a moment a test can rely on)."""
    import os
    import signal

    net = tiny_conv_net()
    if os.environ.get("FLOWERS_TEST_INTERRUPT"):
        def interrupt(module, inputs):
            os.kill(os.getpid(), signal.SIGINT)
        net.register_forward_pre_hook(interrupt)
    return net

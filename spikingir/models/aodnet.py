"""AOD-Net (Li et al., ICCV 2017): all-in-one dehazing network (DESIGN §5).

K-estimation module, every conv with bias and followed by ReLU, paddings keep size::

    x1 = ReLU(conv1(I))                  1x1, 3 -> 3
    x2 = ReLU(conv2(x1))                 3x3, 3 -> 3
    x3 = ReLU(conv3(cat[x1, x2]))        5x5, 6 -> 3
    x4 = ReLU(conv4(cat[x2, x3]))        7x7, 6 -> 3
    K  = ReLU(conv5(cat[x1, x2, x3, x4]))  3x3, 12 -> 3

Clean-image generation: ``J = ReLU(K * I - K + b)`` with ``b = 1``.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["AODNet"]


class AODNet(nn.Module):
    """AOD-Net dehazer. ``forward(I) = recover(estimate_k(I), I)``.

    The convs are the attributes ``conv1`` .. ``conv5`` (in data-flow order) so a
    converter can walk them; ``estimate_k`` is the part an SNN replaces and
    ``recover`` the fixed formula applied to its output.

    Input: ``[B, 3, H, W]`` hazy image in [0, 1].
    """

    b: float = 1.0

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 3, 1, padding=0, bias=True)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1, bias=True)
        self.conv3 = nn.Conv2d(6, 3, 5, padding=2, bias=True)
        self.conv4 = nn.Conv2d(6, 3, 7, padding=3, bias=True)
        self.conv5 = nn.Conv2d(12, 3, 3, padding=1, bias=True)
        self.relu = nn.ReLU()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialisation of the reference implementation: weights N(0, 0.02), biases 0."""
        for conv in self.convs():
            nn.init.normal_(conv.weight, 0.0, 0.02)
            nn.init.zeros_(conv.bias)

    def convs(self) -> list[nn.Conv2d]:
        """conv1 .. conv5 in data-flow order."""
        return [self.conv1, self.conv2, self.conv3, self.conv4, self.conv5]

    @staticmethod
    def _check(x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"AODNet: input must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"AODNet: input must be [B, 3, H, W], got shape {tuple(x.shape)}")

    def estimate_k(self, x: torch.Tensor) -> torch.Tensor:
        """The K-estimation module: K(I), same shape as I."""
        self._check(x)
        x1 = self.relu(self.conv1(x))
        x2 = self.relu(self.conv2(x1))
        x3 = self.relu(self.conv3(torch.cat([x1, x2], 1)))
        x4 = self.relu(self.conv4(torch.cat([x2, x3], 1)))
        return self.relu(self.conv5(torch.cat([x1, x2, x3, x4], 1)))

    def recover(self, k: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Clean-image generation ``J = ReLU(K * I - K + 1)``."""
        if k.shape != x.shape:
            raise ValueError(f"AODNet.recover: K {tuple(k.shape)} and I {tuple(x.shape)} differ in shape")
        return self.relu(k * x - k + self.b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.recover(self.estimate_k(x), x)

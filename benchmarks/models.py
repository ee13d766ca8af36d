"""Synthetic models for ``benchmarks/synthetic.py``, one per gradient profile.

============  ===========  =========  ==================================================================
model         parameters   tensors    what it stresses
============  ===========  =========  ==================================================================
mlp_big       26.2 M       8          bandwidth: 105 MB of gradients in a few big tensors
many_small    5.0 M        482        per-tensor overhead: many small gradients (fusion matters)
cnn           2.8 M        62         compute: a small ResNet on 32x32 images; BatchNorm buffers
============  ===========  =========  ==================================================================

Each entry of :data:`MODELS` builds the model and a batch of synthetic inputs and class targets;
the same seed gives the same weights in every mode, so every mode starts from the same model.
Sizes are chosen so that a step takes 150-250 milliseconds on one CPU core.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

__all__ = ["ModelSpec", "MODELS", "build_model", "synthetic_batch"]


class _MLPBig(nn.Module):
    """Four linear layers, 1024 -> 4096 -> 4096 -> 1024 -> 1000: 26.2 M parameters in 8 tensors."""

    def __init__(self, widths=(1024, 4096, 4096, 1024, 1000)):
        super().__init__()
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(widths) - 2:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class _PreNormBlock(nn.Module):
    """``x + Linear(LayerNorm(x))``: 4 tensors; the residual form keeps 120 of them finite."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        return x + self.proj(self.norm(x))


class _ManySmall(nn.Module):
    """120 pre-norm residual blocks of width 202 and a 10-way head: 5.0 M parameters in 482 tensors."""

    def __init__(self, width: int = 202, blocks: int = 120, classes: int = 10):
        super().__init__()
        self.blocks = nn.Sequential(*[_PreNormBlock(width) for _ in range(blocks)])
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(self.blocks(x))


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.short is None else self.short(x)))


class _SmallResNet(nn.Module):
    """ResNet-18's layout (4 stages of 2 basic blocks) at half width, for 32x32 inputs: 2.8 M parameters."""

    def __init__(self, widths=(32, 64, 128, 256), classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU())
        stages, cin = [], widths[0]
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            stages += [_BasicBlock(cin, w, stride), _BasicBlock(w, w, 1)]
            cin = w
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(cin, classes)

    def forward(self, x):
        x = self.stages(self.stem(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


@dataclass(frozen=True)
class ModelSpec:
    """How to build one benchmark model and its synthetic batch."""

    name: str
    build: Callable[[], nn.Module]
    #: Shape of one input sample.
    sample_shape: tuple[int, ...]
    classes: int
    #: Default per-rank batch size: forward+backward+SGD step alone (the ``nocomm`` mode) measured
    #: 200-220 ms (mlp_big), 145 ms (many_small), 220 ms (cnn) on one core here.
    batch_size: int
    description: str


MODELS: dict[str, ModelSpec] = {
    "mlp_big": ModelSpec("mlp_big", _MLPBig, (1024,), 1000, 64,
                         "4-layer MLP, 26.2 M params in 8 tensors (bandwidth-heavy)"),
    "many_small": ModelSpec("many_small", _ManySmall, (202,), 10, 256,
                            "120 pre-norm residual blocks, 5.0 M params in 482 tensors"),
    "cnn": ModelSpec("cnn", _SmallResNet, (3, 32, 32), 10, 16,
                     "ResNet-18 layout at half width on 32x32 images, 2.8 M params"),
}


def build_model(name: str, seed: int = 0) -> nn.Module:
    """Model ``name`` with weights from ``seed`` (identical for every mode and rank)."""
    torch.manual_seed(seed)
    return MODELS[name].build()


def synthetic_batch(name: str, batch_size: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random inputs and class targets for model ``name``."""
    spec = MODELS[name]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((batch_size, *spec.sample_shape), generator=gen)
    y = torch.randint(0, spec.classes, (batch_size,), generator=gen)
    return x, y

"""Model factories from outside the project for the model zoo test: torchvision classifiers, small inputs.

Each returns ``(module, example)``: autopart trains them on synthetic data (it brings no data for them).
"""
from __future__ import annotations

import torch
from torch import nn


def resnet18() -> tuple[nn.Module, torch.Tensor]:
    from torchvision.models import resnet18 as make

    return make(num_classes=10), torch.randn(2, 3, 32, 32)


def mobilenet_v3_small() -> tuple[nn.Module, torch.Tensor]:
    from torchvision.models import mobilenet_v3_small as make

    return make(num_classes=10), torch.randn(2, 3, 32, 32)

"""Models that are not a chain of their children, for the graph tests: factories in the ``file.py:make`` form."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class UNet(nn.Module):
    """Two levels down and up with BatchNorm; the first level's output skips to the last block (``up1``)."""

    def __init__(self) -> None:
        super().__init__()
        self.down1 = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.down2 = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, stride=2), nn.BatchNorm2d(8), nn.ReLU())
        self.mid = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.up2 = nn.ConvTranspose2d(16, 4, 2, stride=2)
        self.up1 = nn.Conv2d(8, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d1 = self.down1(x)
        d2 = self.down2(d1)
        m = self.mid(d2)
        u2 = self.up2(torch.cat([m, d2], 1))
        return self.up1(torch.cat([u2, d1], 1))


def unet() -> dict[str, Any]:
    return {"module": UNet(), "example": torch.randn(2, 1, 8, 8), "loss_fn": F.mse_loss}


class TwoInTwoOut(nn.Module):
    """Two inputs (features and a per-sample scale) and two outputs; the scale is needed by the last block."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(6, 16)
        self.body = nn.Linear(16, 16)
        self.head_a = nn.Linear(16, 3)
        self.head_b = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.tanh(self.enc(x))
        h = torch.tanh(self.body(h)) + h
        return self.head_a(h) * scale, self.head_b(h)


def two_loss(out: tuple[torch.Tensor, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out[0], target) + out[1].pow(2).mean()


def two_in_two_out() -> dict[str, Any]:
    return {"module": TwoInTwoOut(), "example": (torch.randn(4, 6), torch.rand(4, 1) + 0.5), "loss_fn": two_loss}


def hf_lm_loss(out: Any, target: torch.Tensor) -> torch.Tensor:
    logits = out.logits if hasattr(out, "logits") else out[0]
    return F.cross_entropy(logits.flatten(0, 1), target.flatten())


def hf_gpt2() -> dict[str, Any]:
    """A tiny Hugging Face GPT-2 with its tied embedding (no dropout, so runs compare exactly)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=256, n_positions=32, use_cache=False,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return {"module": GPT2LMHeadModel(cfg), "example": torch.randint(0, 256, (2, 16)), "loss_fn": hf_lm_loss}


def two_in_two_out_keywords() -> dict[str, Any]:
    """The same model, its example given as keyword inputs."""
    return {"module": TwoInTwoOut(), "example": {"x": torch.randn(4, 6), "scale": torch.rand(4, 1) + 0.5},
            "loss_fn": two_loss}

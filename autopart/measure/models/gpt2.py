"""GPT-2 with the real shapes, random weights, one block per pipeline unit.

    autopart profile gpt2-small --input-shape 1,128 -o p.json

The model is an ``nn.Sequential`` of ``embed`` (token + position embedding),
``h`` (a Sequential of transformer layers ``h.0`` ... ``h.N-1``) and ``head``
(final LayerNorm + LM head). The LM head owns a separate copy of the
embedding matrix (untied), as pipeline setups usually do, so the first and
the last stage each hold their own.

Weights: GPT-2's scheme, as one ``_init_weights(module)`` per module (the contract
:mod:`autopart.run.build` runs per stage): each layer's own ``reset_parameters``, then every matrix
normal with std 0.02, and the residual projections (``c_proj``) 0.02 / sqrt(2 n_layer).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__: list[str] = []


@dataclass(frozen=True)
class GPT2Config:
    vocab_size: int = 50257  # GPT-2's BPE vocabulary
    context: int = 1024  # longest sequence (position embeddings)
    n_layer: int = 12
    n_embd: int = 768  # model width
    n_head: int = 12
    dropout: float = 0.0  # 0 keeps pipelined and single-process runs bit-comparable


SIZES = {
    "gpt2-tiny": GPT2Config(context=256, n_layer=4, n_embd=128, n_head=4),
    # GPT-2's vocabulary on a narrow model: the LM head costs about as much as all the layers
    "gpt2-mini": GPT2Config(context=256, n_layer=24, n_embd=256, n_head=4),
    "gpt2-small": GPT2Config(n_layer=12, n_embd=768, n_head=12),
    "gpt2-medium": GPT2Config(n_layer=24, n_embd=1024, n_head=16),
    "gpt2-large": GPT2Config(n_layer=36, n_embd=1280, n_head=20),
    "gpt2-xl": GPT2Config(n_layer=48, n_embd=1600, n_head=25),
}


class Embedding(nn.Module):
    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.context, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        return self.drop(self.wte(idx) + self.wpe(pos))


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, c))


class MLP(nn.Module):
    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Head(nn.Module):
    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.ln_f(x))


class GPT2(nn.Sequential):
    """``embed`` -> ``h.0`` ... ``h.N-1`` -> ``head``; logits of shape (batch, seq, vocab)."""

    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__(OrderedDict(
            embed=Embedding(cfg),
            h=nn.Sequential(*[TransformerBlock(cfg) for _ in range(cfg.n_layer)]),
            head=Head(cfg),
        ))
        self.config = cfg
        self.apply(self._init_weights)  # children first: a residual projection is scaled after its own init

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """One module's weights (its parameters, and a residual projection below it): the layer's own
        ``reset_parameters``, then its matrices normal with std 0.02; an attention or MLP's ``c_proj`` weight
        normal with GPT-2's std 0.02 / sqrt(2 n_layer)."""
        if isinstance(module, (nn.Linear, nn.Embedding, nn.LayerNorm)):
            module.reset_parameters()
            if module.weight.dim() >= 2:
                nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, (CausalSelfAttention, MLP)):  # GPT-2's scaled init of residual projections
            nn.init.normal_(module.c_proj.weight, std=0.02 / (2 * self.config.n_layer) ** 0.5)


def lm_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy: (batch, seq, vocab) logits against (batch, seq) ids."""
    return F.cross_entropy(logits.flatten(0, 1).float(), target.flatten())

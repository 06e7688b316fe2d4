"""Models for tests/test_build.py: a buffer computed in ``__init__``, a parameter nothing initialises, and two
stages of very different sizes (to measure each rank's build)."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class Sinusoidal(nn.Module):
    """Adds a sinusoidal position table, a buffer computed in ``__init__`` (never by ``reset_parameters``)."""

    def __init__(self, seq: int, width: int) -> None:
        super().__init__()
        pos = torch.arange(seq, dtype=torch.float32)[:, None]
        freq = torch.exp(torch.arange(0, width, 2, dtype=torch.float32) * (-math.log(10000.0) / width))
        table = torch.zeros(seq, width)
        table[:, 0::2], table[:, 1::2] = torch.sin(pos * freq), torch.cos(pos * freq)
        self.register_buffer("table", table)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.table[: x.shape[1]]


def sinusoidal() -> dict[str, Any]:
    """Byte embedding -> position table -> two layers -> head: the table is on the first stage's rank."""
    module = nn.Sequential(nn.Embedding(256, 16), Sinusoidal(8, 16), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 256))
    return {"module": module, "example": torch.randint(0, 256, (4, 8)),
            "loss_fn": lambda out, y: F.cross_entropy(out.flatten(0, 1), y.flatten()), "data_kind": "text"}


class Scale(nn.Module):
    """A module with its own parameter and no ``reset_parameters``: nothing autopart can run initialises it."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.rand(width) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gain


def uncovered() -> dict[str, Any]:
    module = nn.Sequential(nn.Linear(8, 8), Scale(8), nn.Linear(8, 4))
    return {"module": module, "example": torch.randn(4, 8), "loss_fn": F.mse_loss}


def lopsided() -> dict[str, Any]:
    """Stage 0 (one block) holds 64 MiB of parameters, stage 1 (one block) 1 MiB."""
    module = nn.Sequential(nn.Linear(4096, 4096, bias=False), nn.Linear(4096, 64, bias=False))
    return {"module": module, "example": torch.randn(2, 4096), "loss_fn": F.mse_loss}


class Net(nn.Module):
    """A body and a head; ``reset_parameters``, which ``__init__`` calls, zeroes the head's bias and fills ``gain``
    (writes in place that are the model's own construction, which autopart runs per stage)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(8, 8)
        self.head = nn.Linear(8, 4)
        self.gain = nn.Parameter(torch.empty(8))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.head.bias)
        with torch.no_grad():
            self.gain.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(x)) * self.gain)


def _net(module: nn.Module) -> dict[str, Any]:
    return {"module": module, "example": torch.randn(4, 8), "loss_fn": F.mse_loss}


def own_init() -> dict[str, Any]:
    """Writes in place only while it is constructed: built per stage."""
    return _net(Net())


def loads_state_dict() -> dict[str, Any]:
    """Loads a state dict saved beside this file, as torchvision's and timm's pretrained builders do."""
    import os

    model = Net()
    model.load_state_dict(torch.load(os.environ["AUTOPART_TEST_STATE"], weights_only=True))
    return _net(model)


def zeroes_head() -> dict[str, Any]:
    model = Net()
    nn.init.zeros_(model.head.weight)
    return _net(model)


def copies_under_no_grad() -> dict[str, Any]:
    model = Net()
    with torch.no_grad():
        model.body.weight.copy_(torch.eye(8))
    return _net(model)


def fills_data() -> dict[str, Any]:
    model = Net()
    model.body.bias.data.fill_(0.5)
    return _net(model)


def assigns() -> dict[str, Any]:
    model = Net()
    model.load_state_dict({"head.weight": torch.full((4, 8), 0.25)}, strict=False, assign=True)
    return _net(model)


def sets_data() -> dict[str, Any]:
    model = Net()
    model.head.weight.data = torch.ones(4, 8)
    return _net(model)


def helper_loads() -> dict[str, Any]:
    """Loads through a helper of its own (as a pretrained builder does): the note names the factory's line."""
    return _net(_pretrained())


def _pretrained() -> Net:
    model = Net()
    model.load_state_dict({k: torch.zeros_like(v) for k, v in Net().state_dict().items()})
    return model


class InitZeroes(Net):
    """Zeroes the head's bias in ``__init__``, outside ``reset_parameters``: a per-stage build would lose it."""

    def __init__(self) -> None:
        super().__init__()
        nn.init.constant_(self.head.bias, 0.5)


def init_writes() -> dict[str, Any]:
    return _net(InitZeroes())


class Block(nn.Module):
    """nanoGPT's block, small: attention and MLP projections named as nanoGPT names them."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(width)
        self.c_attn = nn.Linear(width, width)
        self.c_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.c_proj(torch.tanh(self.c_attn(self.ln(x))))


class NanoGPT(nn.Module):
    """As nanoGPT's ``GPT.__init__``: ``self.apply(self._init_weights)``, then a scaled normal init of every
    ``c_proj.weight`` in ``__init__`` itself (``fixed=True``: that loop moved into ``_init_weights``)."""

    def __init__(self, n_layer: int = 2, width: int = 16, fixed: bool = False) -> None:
        super().__init__()
        self.n_layer, self.fixed = n_layer, fixed
        self.wte = nn.Embedding(256, width)
        self.h = nn.Sequential(*(Block(width) for _ in range(n_layer)))
        self.lm_head = nn.Linear(width, 256, bias=False)
        self.wte.weight = self.lm_head.weight  # tied, as nanoGPT does
        self.apply(self._init_weights)
        if not fixed:
            for pn, p in self.named_parameters():
                if pn.endswith("c_proj.weight"):
                    torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            std = 0.02 / math.sqrt(2 * self.n_layer) if self.fixed and module in self._projections() else 0.02
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def _projections(self) -> list[nn.Module]:
        return [block.c_proj for block in self.h]

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.h(self.wte(idx)))


def _text(module: nn.Module) -> dict[str, Any]:
    return {"module": module, "example": torch.randint(0, 256, (4, 8)),
            "loss_fn": lambda out, y: F.cross_entropy(out.flatten(0, 1), y.flatten()), "data_kind": "text"}


def nanogpt() -> dict[str, Any]:
    return _text(NanoGPT())


def nanogpt_fixed() -> dict[str, Any]:
    return _text(NanoGPT(fixed=True))


def transformer() -> dict[str, Any]:
    """``nn.Transformer``: its ``__init__`` draws xavier for every matrix (``_reset_parameters``)."""
    module = nn.Transformer(d_model=16, nhead=2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=32,
                            dropout=0.0, batch_first=True)
    return {"module": module, "example": (torch.randn(2, 4, 16), torch.randn(2, 4, 16)), "loss_fn": F.mse_loss}


def attention() -> dict[str, Any]:
    """An ``nn.MultiheadAttention``, whose ``__init__`` calls ``_reset_parameters`` (xavier, zero biases)."""

    class Attend(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
            self.head = nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.attn(x, x, x, need_weights=False)[0])

    return {"module": Attend(), "example": torch.randn(2, 4, 16), "loss_fn": F.mse_loss}


def torch_parts() -> dict[str, Any]:
    """torch's own modules whose construction is ``reset_parameters``: built per stage."""

    class Parts(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(32, 8, padding_idx=0)
            self.conv1 = nn.Conv1d(8, 8, 3, padding=1)
            self.conv2 = nn.Conv2d(1, 2, 3, padding=1)
            self.conv_t = nn.ConvTranspose1d(8, 8, 3, padding=1)
            self.bn = nn.BatchNorm1d(8)
            self.gn = nn.GroupNorm(2, 8)
            self.ln = nn.LayerNorm(8)
            self.lstm = nn.LSTM(8, 8, batch_first=True)
            self.gru = nn.GRU(8, 8, batch_first=True)
            self.prelu = nn.PReLU()
            self.head = nn.Linear(8, 4)

        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            x = self.embed(idx)  # (b, t, 8)
            x = self.bn(self.conv1(x.transpose(1, 2)))
            x = self.gn(self.conv_t(x)).transpose(1, 2) + self.conv2(x[:, None]).mean(1).transpose(1, 2)
            x = self.lstm(self.ln(x))[0]
            return self.head(self.prelu(self.gru(x)[0]))

    return {"module": Parts(), "example": torch.randint(0, 32, (2, 6)), "loss_fn": F.mse_loss}


def _moved(how: str) -> dict[str, Any]:
    model = Net()
    if how == "to_cpu":
        model = model.to("cpu")
    elif how == "cuda":
        model = model.cuda()
    elif how == "float":
        model = model.float()
    elif how == "bf16":
        model = model.to(torch.bfloat16)
    return _net(model)


def ends_to_cpu() -> dict[str, Any]:
    return _moved("to_cpu")


def ends_cuda() -> dict[str, Any]:
    return _moved("cuda")


def ends_float() -> dict[str, Any]:
    return _moved("float")


def ends_bf16() -> dict[str, Any]:
    return _moved("bf16")


def reads_a_weight() -> dict[str, Any]:
    """Reads a value out of a weight (``.item()`` fails on the meta device)."""
    model = Net()
    model.scale = float(model.body.weight.detach().abs().max())
    return _net(model)


def weight_norm() -> dict[str, Any]:
    model = Net()
    model.body = nn.utils.parametrizations.weight_norm(model.body)
    return _net(model)


def clones() -> dict[str, Any]:
    """Blocks cloned with ``copy.deepcopy`` (as ``nn.TransformerEncoder`` and many models' ``_get_clones`` do)."""
    import copy

    block = Block(16)
    module = nn.Sequential(nn.Embedding(256, 16), *(copy.deepcopy(block) for _ in range(3)), nn.Linear(16, 256))
    return _text(module)


def sinusoidal_to_cpu() -> dict[str, Any]:
    """:func:`sinusoidal`, its factory ending in ``.to("cpu")`` (the launcher builds it on meta, the ranks per
    stage)."""
    made = sinusoidal()
    made["module"] = made["module"].to("cpu")
    return made


def chain_reads_a_weight() -> dict[str, Any]:
    """A chain whose factory reads a weight's value: it cannot run on meta, the launcher's build included."""
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))
    model.scale = float(model[0].weight.detach().abs().max())
    return {"module": model, "example": torch.randn(4, 8), "loss_fn": F.mse_loss}


class SpanningInit(nn.Sequential):
    """Four ``Linear(8, 8)`` whose container's own ``reset_parameters`` draws for every child (after the children's
    own): a stage that holds some of them is drawn where a whole build draws them only if the draws for the
    others, still on meta, are made too."""

    def __init__(self) -> None:
        super().__init__(*(nn.Linear(8, 8) for _ in range(4)))

    def reset_parameters(self) -> None:
        for layer in self:
            nn.init.normal_(layer.weight, std=0.02)


class RootDraws(nn.Sequential):
    """A root ``_init_weights`` that, called on the root, draws for a child it is not called on (layer 3), after
    the children's own."""

    def __init__(self) -> None:
        super().__init__(*(nn.Linear(8, 8) for _ in range(4)))

    def _init_weights(self, module: nn.Module) -> None:
        if module is self:
            nn.init.normal_(self[3].weight, std=0.5)
            nn.init.kaiming_uniform_(self[1].weight)
        elif isinstance(module, nn.Linear):
            nn.init.xavier_normal_(module.weight)
            nn.init.zeros_(module.bias)


class OrthogonalInit(nn.Sequential):
    """A container's ``reset_parameters`` with ``orthogonal_`` (drawn into a ``new_empty``, then a QR),
    ``trunc_normal_`` (``uniform_``, then ``erfinv``) and ``sparse_`` (``normal_``, then ``randperm``)."""

    def __init__(self) -> None:
        super().__init__(*(nn.Linear(8, 8) for _ in range(4)))

    def reset_parameters(self) -> None:
        for layer in self:
            nn.init.orthogonal_(layer.weight)
            nn.init.trunc_normal_(layer.bias, std=0.1)
            nn.init.sparse_(layer.weight, sparsity=0.25)


class PoissonInit(nn.Sequential):
    """A container's init whose draws for a child depend on values (``poisson``): cannot be replayed on meta."""

    def __init__(self) -> None:
        super().__init__(*(nn.Linear(8, 8) for _ in range(4)))

    def reset_parameters(self) -> None:
        for layer in self:
            with torch.no_grad():
                layer.weight.copy_(torch.poisson(torch.ones_like(layer.weight)) * 0.1)


def spanning_init() -> dict[str, Any]:
    return _net(SpanningInit())


def root_draws() -> dict[str, Any]:
    return _net(RootDraws())


def orthogonal_init() -> dict[str, Any]:
    return _net(OrthogonalInit())


def poisson_init() -> dict[str, Any]:
    return _net(PoissonInit())

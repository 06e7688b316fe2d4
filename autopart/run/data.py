"""Real training data that exists on every machine, without downloads.

- Text: byte-level language modelling on a corpus of files (``--data`` file or
  folder; by default the Python standard library's own source files). Token
  ids are bytes, 0-255, which GPT-2's vocabulary includes. Encoder-decoders
  (``seq2seq-text``) read a window of the text and write the bytes after it.
  An ``hf:PATH`` model whose folder has a ``tokenizer.json`` reads the same
  text (or ``.jsonl`` documents) as its own tokens instead (:mod:`autopart.run.tokens`).
- Images: scikit-learn's 8x8 handwritten digits (1,797 real images shipped in
  the package), upsampled to the model's input size.

Every rank draws the same batches from the same seed, so the first stage's
inputs and the last stage's targets agree without any communication.
``--eval-every`` holds out the last 5% of the text's token stream (or of the
digits): training never draws from it, and each evaluation reads the same
batches of it, in order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from autopart.errors import AutopartError
from autopart.measure.spec import ModelBundle, call_model
from autopart.run.texts import MAX_TEXT_BYTES, default_corpus_files
from autopart.run.tokens import tokenize_for, tokenizer_file
from autopart.torch_compat import pytree

__all__ = ["TextCorpus", "Digits", "default_corpus_files", "Batches", "TrainingData", "training_data", "text_corpus",
           "cycled_note", "TEXT_KINDS", "HELD_OUT_SHARE", "MAX_TEXT_BYTES"]

Batches = Iterator[tuple[torch.Tensor | tuple[torch.Tensor, ...], torch.Tensor]]
"""Mini-batches of (inputs, targets), one per step; the inputs a tensor, or a tuple for several inputs."""


HELD_OUT_SHARE = 0.05
"""The share of the data ``--eval-every`` holds out: the last 5% of a text's token stream, the last 5% of the
digits (the same on every resume: it depends on the data alone)."""

TEXT_KINDS = ("text", "masked-text", "seq2seq-text")
"""The data kinds read from a text corpus: next bytes, masked bytes, the bytes after a source window."""


class TextCorpus:
    """Random windows of a token stream: inputs are tokens t..t+T-1, targets t+1..t+T.

    Bytes by default: the stream is held as ``uint8`` (one byte per token), memory-mapped read-only from the
    file when ``--data`` is one file, else the files joined in memory. A model with its own tokenizer gives
    the stream instead (``tokens``: ``uint16`` or ``int32``, :mod:`autopart.run.tokens`). Only each drawn
    window becomes int64 token ids, so a rank's host memory holds the corpus once, compactly (not at eight
    bytes a token).

    With a held-out split (``held_out=True``) the last :data:`HELD_OUT_SHARE` of the stream is never drawn for
    training: :meth:`held_out_batches` reads it in order. Without one, windows come from the whole stream,
    as they always did.
    """

    def __init__(self, path: str | None = None, *, tokens: npt.NDArray[np.integer[Any]] | None = None,
                 source: str | None = None, held_out: bool = False, mask_id: int | None = None) -> None:
        self.mask_id = mask_id
        """The tokenizer's mask token (masked LMs); None for bytes."""
        if tokens is not None:
            self.tokens: npt.NDArray[np.integer[Any]] = tokens
            self.source = source or "tokens"
            unit = "tokens"
        else:
            if path is None:
                files = default_corpus_files()
                self.source = f"Python standard library sources ({len(files)} files)"
            else:
                p = Path(path)
                if not p.exists():
                    raise AutopartError(f"--data {path!r} does not exist")
                files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
                self.source = str(p)
            mapped = _mapped(Path(path)) if path is not None and Path(path).is_file() else None
            self.tokens = mapped if mapped is not None else np.frombuffer(_joined(files), dtype=np.uint8)
            unit = "bytes"
            if self.tokens.size < 1024:
                raise AutopartError(f"text corpus {self.source!r} has only {self.tokens.size} bytes; need at "
                                    f"least 1 KiB")
        size = int(self.tokens.size)
        self.unit = unit
        """What one entry of the stream is, in messages: bytes or tokens."""
        self.train_size = size - math.ceil(size * HELD_OUT_SHARE) if held_out else size
        """Tokens that training windows are drawn from: the stream's first ones (all without a held-out split)."""

    @property
    def nbytes(self) -> int:
        """Bytes of host memory (or of the mapped file) the corpus takes: one a token for bytes."""
        return int(self.tokens.nbytes)

    def _window(self, idx: npt.NDArray[np.int64]) -> torch.Tensor:
        """The tokens at ``idx`` as int64 token ids (a copy: only these windows are ever int64)."""
        return torch.from_numpy(np.asarray(self.tokens[idx], dtype=np.int64))

    def batches(self, batch: int, seq_len: int, seed: int, start_step: int = 0) -> Batches:
        size = self.train_size
        if seq_len + 1 >= size:
            raise AutopartError(f"sequence length {seq_len} does not fit a corpus of {size} {self.unit}")
        step = start_step
        while True:
            g = torch.Generator().manual_seed(seed * 1_000_003 + step)
            starts = torch.randint(0, size - seq_len - 1, (batch,), generator=g)
            idx = starts[:, None] + torch.arange(seq_len + 1)[None, :]
            window = self._window(idx.numpy())
            yield window[:, :-1].contiguous(), window[:, 1:].contiguous()
            step += 1

    def held_out_batches(self, count: int, batch: int, seq_len: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``count`` batches of the held-out split: consecutive windows of ``seq_len + 1`` tokens from its start,
        none overlapping (the same every time, and never among the training windows)."""
        held, windows, need = int(self.tokens.size) - self.train_size, count * batch, seq_len + 1
        if held < windows * need:
            raise AutopartError(f"the held-out split (the last {HELD_OUT_SHARE:.0%} of {self.source}: {held:,} "
                                f"{self.unit}) holds {held // need} windows of {need}; --eval-batches {count} of "
                                f"{batch} need {windows}: give more text or fewer --eval-batches")
        starts = self.train_size + need * np.arange(windows, dtype=np.int64)
        window = self._window(starts[:, None] + np.arange(need, dtype=np.int64)[None, :])
        return [(w[:, :-1].contiguous(), w[:, 1:].contiguous()) for w in window.split(batch)]


def _joined(files: list[Path]) -> bytes:
    """The files' bytes joined by newlines, up to :data:`MAX_TEXT_BYTES` (unreadable files skipped)."""
    chunks, total = [], 0
    for f in files:
        try:
            data = f.read_bytes()
        except OSError:
            continue
        chunks.append(data)
        total += len(data)
        if total >= MAX_TEXT_BYTES:
            break
    return b"\n".join(chunks)[:MAX_TEXT_BYTES]


def _mapped(path: Path) -> npt.NDArray[np.uint8] | None:
    """The file's first :data:`MAX_TEXT_BYTES` bytes, memory-mapped read-only; None when it cannot be mapped
    (empty, unreadable: the caller reads it, and says what is wrong)."""
    try:
        size = min(path.stat().st_size, MAX_TEXT_BYTES)
        if size == 0:
            return None
        return np.memmap(path, dtype=np.uint8, mode="r", shape=(size,))
    except (OSError, ValueError):
        return None


class Digits:
    """scikit-learn's digits: 1,797 real 8x8 greyscale images of 0-9 (with a held-out split, the last
    :data:`HELD_OUT_SHARE` of them are never drawn for training)."""

    def __init__(self, held_out: bool = False) -> None:
        try:
            from sklearn.datasets import load_digits
        except ImportError:
            raise AutopartError("the digits data needs scikit-learn (pip install scikit-learn)") from None
        data = load_digits()
        self.images = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0  # (n, 1, 8, 8) in [0, 1]
        self.labels = torch.tensor(data.target, dtype=torch.long)
        self.source = f"scikit-learn digits ({len(self.labels)} images)"
        n = len(self.labels)
        self.train_size = n - math.ceil(n * HELD_OUT_SHARE) if held_out else n
        """Images that training draws from: the first ones (all without a held-out split)."""

    def batches(self, batch: int, sample_shape: tuple[int, ...], seed: int, start_step: int = 0) -> Batches:
        step = start_step
        while True:
            g = torch.Generator().manual_seed(seed * 1_000_003 + step)
            idx = torch.randint(0, self.train_size, (batch,), generator=g)
            yield _shaped(self.images[idx], sample_shape), self.labels[idx]
            step += 1

    def held_out_batches(self, count: int, batch: int, sample_shape: tuple[int, ...]
                         ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``count`` batches of the held-out images, in order (the same every time)."""
        held = len(self.labels) - self.train_size
        if held < count * batch:
            raise AutopartError(f"the held-out split (the last {HELD_OUT_SHARE:.0%} of the digits: {held} images) "
                                f"holds fewer than --eval-batches {count} of {batch} ({count * batch} images): "
                                f"give fewer --eval-batches or a smaller --global-batch")
        idx = torch.arange(self.train_size, self.train_size + count * batch)
        return [(_shaped(self.images[i], sample_shape), self.labels[i]) for i in idx.split(batch)]


def _shaped(x: torch.Tensor, sample_shape: tuple[int, ...]) -> torch.Tensor:
    """Digit images as the model takes them: flat features (the MLP), or resized to its input size."""
    if len(sample_shape) == 1:
        x = x.flatten(1)
        if x.shape[1] != sample_shape[0]:
            raise AutopartError(f"digits have 64 features, the model takes {sample_shape[0]}")
    elif tuple(sample_shape[1:]) != tuple(x.shape[2:]):
        x = F.interpolate(x, size=tuple(sample_shape[1:]), mode="bilinear", align_corners=False)
    return x


@dataclass(frozen=True)
class TrainingData:
    """What a run trains on: the batches, where they come from, the loss, and tokens per sample."""

    batches: Batches
    source: str
    """Said in the start line: a corpus, the digits, the factory's data, or SYNTHETIC."""
    loss_fn: Callable[[Any, Any], torch.Tensor]
    tokens_per_sample: int
    """Sequence length for text (throughput in tokens/s), else 1 (samples/s)."""
    batches_per_pass: int | None = None
    """How many batches the factory's data has, where it says (``len``); None for data without an end."""
    held_out: list[tuple[Any, torch.Tensor]] | None = None
    """``--eval-every``'s batches of (inputs, target) from the held-out split, the same at every evaluation; None
    without ``--eval-every``."""


def training_data(bundle: ModelBundle, data_path: str | None, global_batch: int, sample_shape: tuple[int, ...],
                  seed: int, start_step: int, eval_batches: int = 0) -> TrainingData:
    """The built-ins' real data, the factory's own, or labelled synthetic data; batch i depends on the seed and i
    only. ``eval_batches`` > 0 (``--eval-every``): that many batches of a held-out split too, which training then
    never draws from (refused for data that has none: the factory's own, synthetic)."""
    name = bundle.name
    held = eval_batches > 0
    if bundle.data is None and bundle.data_kind in TEXT_KINDS:
        assert bundle.loss_fn is not None
        corpus = text_corpus(bundle, data_path, held)
        seq = sample_shape[0]
        if bundle.data_kind == "seq2seq-text":
            assert bundle.example is not None and len(bundle.example) == 2
            target_len = int(bundle.example[1].shape[-1])
            window = seq + target_len - 1
            batches = _source_and_target(corpus.batches(global_batch, window, seed, start_step), seq)
            evals = list(_source_and_target(iter(corpus.held_out_batches(eval_batches, global_batch, window)), seq)) \
                if held else None
            return TrainingData(batches, corpus.source, bundle.loss_fn, seq + target_len, held_out=evals)
        batches = corpus.batches(global_batch, seq, seed, start_step)
        evals = list(corpus.held_out_batches(eval_batches, global_batch, seq)) if held else None
        if bundle.data_kind == "masked-text":
            mask_id = _mask_id(bundle, corpus)
            batches = _masked(batches, seed, start_step, mask_id)
            if evals is not None:
                evals = list(_masked(iter(evals), seed, _EVAL_MASK_STEP, mask_id))
        return TrainingData(batches, corpus.source, bundle.loss_fn, seq, held_out=evals)
    if bundle.data is None and bundle.data_kind == "digits":
        assert bundle.loss_fn is not None
        if data_path:
            raise AutopartError(f"--data for {name} is not supported: it trains on scikit-learn's digits")
        digits = Digits(held)
        images = list(digits.held_out_batches(eval_batches, global_batch, sample_shape)) if held else None
        return TrainingData(digits.batches(global_batch, sample_shape, seed, start_step), digits.source,
                            bundle.loss_fn, 1, held_out=images)
    if held:
        what = "the factory's own data" if bundle.data is not None else "synthetic data"
        raise AutopartError(f"--eval-every needs data with a held-out split (text, or the digits); model {name!r} "
                            f"trains on {what}, which has none")
    if bundle.data is not None:
        if bundle.loss_fn is None:
            raise AutopartError(f"model {name!r} gives data but no loss_fn")
        return TrainingData(_user_batches(bundle.data, global_batch, bundle.input_names, start_step),
                            "the factory's data", bundle.loss_fn, 1, _length(bundle.data))
    return TrainingData(_synthetic(bundle, global_batch, sample_shape, seed, start_step),
                        "SYNTHETIC (random inputs, MSE to a fixed random target: measures speed, learns nothing)",
                        _synthetic_loss, 1)


def text_corpus(bundle: ModelBundle, data_path: str | None, held_out: bool = False) -> TextCorpus:
    """The text a text model trains on: tokenized with the model's own tokenizer where its ``hf:PATH`` folder
    has one (:mod:`autopart.run.tokens`), else bytes."""
    found = tokenizer_file(bundle.name)
    if found is None:
        return TextCorpus(data_path, held_out=held_out)
    text = tokenize_for(found, data_path, _vocab_size(bundle))
    return TextCorpus(tokens=text.tokens, source=text.description, held_out=held_out, mask_id=text.mask_id)


def _vocab_size(bundle: ModelBundle) -> int | None:
    """The model's vocabulary size, where its config says it (a ``transformers`` model, or a module that wraps
    one: the first of its modules with a ``config`` that has ``vocab_size``)."""
    for module in bundle.module.modules():
        size = getattr(getattr(module, "config", None), "vocab_size", None)
        if isinstance(size, int) and not isinstance(size, bool):
            return size
    return None


MASK_SHARE = 0.15
"""Share of the tokens a masked LM has to guess, as BERT's pre-training masks."""

_EVAL_MASK_STEP = 2**40
"""The step number the held-out batches' masks are drawn for: the same masks at every evaluation, drawn from
seeds no training step uses."""


def _mask_id(bundle: ModelBundle, corpus: TextCorpus) -> int:
    """The tokenizer's mask token; for bytes, a token id that no byte is: the vocabulary's last."""
    if corpus.mask_id is not None:
        return corpus.mask_id
    return (_vocab_size(bundle) or 256) - 1


def _masked(batches: Batches, seed: int, start_step: int, mask_id: int) -> Batches:
    """Inputs with 15% of the tokens replaced by the mask id; targets those bytes, the rest ignored (-100)."""
    step = start_step
    for x, _ in batches:
        assert isinstance(x, torch.Tensor)
        g = torch.Generator().manual_seed(seed * 7_000_003 + step)
        chosen = torch.rand(x.shape, generator=g) < MASK_SHARE
        target = torch.where(chosen, x, torch.full_like(x, -100))
        yield torch.where(chosen, torch.full_like(x, mask_id), x), target
        step += 1


def _source_and_target(batches: Batches, source_len: int) -> Batches:
    """From next-byte windows of S+L-1 bytes (w[0:S+L-1] -> w[1:S+L]): the source w[0:S], the decoder's input
    w[S-1:S+L-1] (the target shifted right, led by the source's last byte) and the target w[S:S+L]."""
    for x, y in batches:
        assert isinstance(x, torch.Tensor)
        yield (x[:, :source_len].contiguous(), x[:, source_len - 1:].contiguous()), y[:, source_len - 1:].contiguous()


def _user_batches(data: Iterable[Any], global_batch: int, names: tuple[str, ...] | None, start_step: int) -> Batches:
    """The factory's (input, target) pairs from step ``start_step`` on (a resumed run skips what it trained on),
    cycled: when they run out, the next step starts them again from the first (an epoch). Data that can be
    read only once (a generator) cannot be cycled: running out of it is an error that says how many there were."""
    step = 0
    while True:
        count = 0
        for count, item in enumerate(data, start=1):
            if step >= start_step:
                yield _user_batch(item, count - 1, global_batch, names)
            step += 1
        if count == 0 or iter(data) is data:
            once = "" if count == 0 else (" (it can be read only once, like a generator: give a list, or any "
                                          "iterable that can be read again, to cycle it)")
            raise AutopartError(f"the factory's data ran out after {count} batches, at step {step + 1}{once}")


def _length(data: Iterable[Any]) -> int | None:
    try:
        return len(data)  # type: ignore[arg-type]
    except TypeError:
        return None


def cycled_note(batches: int | None, steps: int) -> str | None:
    """What to say before training when the factory's data has fewer batches than ``steps`` (it is cycled);
    None when it has enough, or when its length is not known before reading it."""
    if batches is None or not 0 < batches < steps:
        return None
    return (f"note: the factory's data has {batches} batches, fewer than --steps {steps}: it is cycled "
            f"({math.ceil(steps / batches)} passes; step {batches + 1} trains on its first batch again)")


def _user_batch(item: Any, i: int, global_batch: int, names: tuple[str, ...] | None) -> tuple[Any, torch.Tensor]:
    """One (input, target) pair of the factory's data, checked; ``i``: its index in the data."""
    if not (isinstance(item, (tuple, list)) and len(item) == 2):
        raise AutopartError(f"the factory's data must yield (input, target) pairs; item {i} is not")
    x, y = item
    if isinstance(x, dict):
        if not names or set(x) != set(names):
            raise AutopartError(f"the factory's data item {i} has inputs {sorted(x)}, the example "
                                f"{sorted(names or ())}")
        x = tuple(x[n] for n in names)
    first = x[0] if isinstance(x, (tuple, list)) else x
    if first.shape[0] != global_batch:
        raise AutopartError(f"the factory's data gives batches of {first.shape[0]}, the run needs {global_batch}")
    return (tuple(x) if isinstance(x, (tuple, list)) else x), y


def _synthetic(bundle: ModelBundle, global_batch: int, sample_shape: tuple[int, ...], seed: int,
               start_step: int) -> Batches:
    """Random inputs shaped like the example (every input), and a fixed random target shaped like the output."""
    if bundle.example is None:
        raise AutopartError(f"model {bundle.name!r} gives no example input to shape synthetic data")
    if any(t.is_meta for t in bundle.example):
        raise AutopartError(f"model {bundle.name!r} gives its example on the meta device: synthetic data needs a real "
                           f"one (give the factory's example as real tensors, or its own data)")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        was = bundle.module.training
        bundle.module.eval()
        out = call_model(bundle.module, [t[:1] for t in bundle.example], bundle.input_names)
        bundle.module.train(was)
    first = next(x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor))
    target = torch.randn((global_batch, *first.shape[1:]), generator=g)
    shapes = [(global_batch, *sample_shape)] + [(global_batch, *t.shape[1:]) for t in bundle.example[1:]]
    return _synthetic_batches(bundle.example, shapes, target, seed, start_step)


def _synthetic_loss(out: Any, target: torch.Tensor) -> torch.Tensor:
    """MSE of the model's first output (of several, if it has several) to the fixed target."""
    first = next(x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor))
    return F.mse_loss(first, target)


def _synthetic_batches(example: tuple[torch.Tensor, ...], shapes: list[tuple[int, ...]], target: torch.Tensor,
                       seed: int, start_step: int) -> Batches:
    step = start_step
    while True:
        gs = torch.Generator().manual_seed(seed * 1_000_003 + step)
        xs = tuple(torch.randn(shape, generator=gs).to(t.dtype) if t.is_floating_point()
                   else torch.randint(0, int(t.max()) + 1, shape, generator=gs) for t, shape in zip(example, shapes))
        yield (xs if len(xs) > 1 else xs[0]), target
        step += 1

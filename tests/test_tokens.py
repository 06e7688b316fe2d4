"""Real text: an hf:PATH model's own tokenizer (made and saved here, offline), documents packed with its
end-of-text token, a held-out split that training never draws from."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from autopart.errors import AutopartError
from autopart.measure.hf import causal_lm_loss, masked_lm_loss
from autopart.measure.spec import ModelBundle
from autopart.run.data import HELD_OUT_SHARE, TextCorpus, text_corpus, training_data
from tests.conftest import assert_one_line_error, run_cli_here

SENTENCES = ["the cat sat on the mat", "a dog ran in the park", "the bird sang a song in the tree",
             "my cat and your dog are friends", "rain fell on the park and the mat"]


def save_tokenizer(folder: Path) -> Any:
    """A word-level tokenizer trained on :data:`SENTENCES`, saved as ``folder/tokenizer.json``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=["<unk>", "</s>", "<mask>"]))
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    return tokenizer


def save_llama(folder: Path, vocab_size: int, seq: int = 8, tokenizer: bool = True) -> ModelBundle:
    """A tiny Llama saved with ``save_pretrained`` into ``folder`` (its config's ``eos_token_id`` is the
    tokenizer's ``</s>``, 1), read back as the bundle an ``hf:PATH`` spec gives."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0,
                         eos_token_id=1, pad_token_id=0, use_cache=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    module = LlamaForCausalLM.from_pretrained(folder)
    return ModelBundle(name=f"hf:{folder}", module=module, example=(torch.zeros(1, seq, dtype=torch.long),),
                       loss_fn=causal_lm_loss, data_kind="text")


@pytest.fixture
def model(tmp_path: Path) -> tuple[ModelBundle, Any]:
    folder = tmp_path / "llama"
    tokenizer = save_tokenizer(folder)
    return save_llama(folder, tokenizer.get_vocab_size()), tokenizer


def _stream(tokenizer: Any, documents: list[str], eos: int) -> list[int]:
    """The known answer: each document's tokens, then the end-of-text token."""
    out: list[int] = []
    for text in documents:
        out += tokenizer.encode(text, add_special_tokens=False).ids + [eos]
    return out


def _is_slice(row: list[int], stream: list[int]) -> bool:
    return any(stream[i:i + len(row)] == row for i in range(len(stream) - len(row) + 1))


def test_jsonl_documents_are_tokenized_joined_with_eos_and_packed(model: tuple[ModelBundle, Any],
                                                                  tmp_path: Path) -> None:
    bundle, tokenizer = model
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": s, "id": i}) + "\n" for i, s in enumerate(SENTENCES[:2])))
    expected = _stream(tokenizer, SENTENCES[:2], eos=tokenizer.token_to_id("</s>"))
    assert expected.count(1) == 2 and len(expected) == 14  # 6 + 6 words, each document ended by </s> (id 1)
    corpus = text_corpus(bundle, str(data))
    assert corpus.tokens.dtype == np.uint16 and corpus.tokens.tolist() == expected
    assert "2 documents, 14 tokens" in corpus.source and "ended by </s>" in corpus.source
    got = training_data(bundle, str(data), 3, (5,), seed=0, start_step=0)
    assert got.tokens_per_sample == 5 and got.held_out is None
    for _ in range(4):  # every window (input, then the target's last token) is 6 consecutive tokens of the stream
        x, y = next(got.batches)
        assert isinstance(x, torch.Tensor) and x.shape == y.shape == (3, 5) and x.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row in torch.cat([x, y[:, -1:]], dim=1).tolist():
            assert _is_slice(row, expected), row


def test_a_text_file_is_one_document_and_a_folder_one_per_file(model: tuple[ModelBundle, Any],
                                                                tmp_path: Path) -> None:
    bundle, tokenizer = model
    one = tmp_path / "one.txt"
    one.write_text("\n".join(SENTENCES))
    assert text_corpus(bundle, str(one)).tokens.tolist() == _stream(tokenizer, ["\n".join(SENTENCES)], eos=1)
    folder = tmp_path / "docs"
    folder.mkdir()
    for i, sentence in enumerate(SENTENCES[:3]):
        (folder / f"{i}.md").write_text(sentence)
    assert text_corpus(bundle, str(folder)).tokens.tolist() == _stream(tokenizer, SENTENCES[:3], eos=1)


@pytest.mark.parametrize("line, why", [("{not json", "line 2 is not JSON"),
                                       ('{"txt": "a typo"}', 'line 2 has no "text" string'),
                                       ('["a list"]', 'line 2 has no "text" string')])
def test_a_bad_jsonl_line_is_named(model: tuple[ModelBundle, Any], tmp_path: Path, line: str, why: str) -> None:
    bundle, _ = model
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"text": SENTENCES[0]}) + "\n" + line + "\n")
    with pytest.raises(AutopartError, match=why):
        text_corpus(bundle, str(data))


def test_a_token_the_model_has_no_row_for_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "small"
    tokenizer = save_tokenizer(folder)
    bundle = save_llama(folder, vocab_size=10)  # fewer rows than the tokenizer's ids
    data = tmp_path / "t.txt"
    data.write_text(" ".join(SENTENCES))
    top = max(tokenizer.encode(" ".join(SENTENCES)).ids)
    with pytest.raises(AutopartError, match=f"gives token id {top} .* vocab_size is 10"):
        text_corpus(bundle, str(data))


def test_the_end_of_text_token_comes_from_the_tokenizer_config_then_the_model_config(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    tokenizer = save_tokenizer(folder)
    bundle = save_llama(folder, tokenizer.get_vocab_size())
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "the cat"}) + "\n")
    cat = tokenizer.encode("the cat").ids
    assert text_corpus(bundle, str(data)).tokens.tolist() == cat + [1]  # config.json's eos_token_id
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<mask>"}}))
    assert text_corpus(bundle, str(data)).tokens.tolist() == cat + [2]  # the tokenizer's own config first
    (folder / "tokenizer_config.json").unlink()
    config = json.loads((folder / "config.json").read_text())
    config.pop("eos_token_id")
    (folder / "config.json").write_text(json.dumps(config))
    assert text_corpus(bundle, str(data)).tokens.tolist() == cat + [1]  # </s> by its usual name


def test_without_a_tokenizer_the_text_stays_bytes(tmp_path: Path) -> None:
    folder = tmp_path / "no-tokenizer"
    bundle = save_llama(folder, vocab_size=300)
    data = tmp_path / "t.txt"
    data.write_bytes(bytes(range(256)) * 8)
    corpus = text_corpus(bundle, str(data))
    assert corpus.tokens.dtype == np.uint8 and corpus.source == str(data)
    assert np.array_equal(corpus.tokens, TextCorpus(str(data)).tokens)
    for a, b in zip(training_data(bundle, str(data), 2, (8,), 0, 0).batches, TextCorpus(str(data)).batches(2, 8, 0)):
        assert all(torch.equal(u, v) for u, v in zip(a, b))
        break


def test_a_masked_lm_masks_with_the_tokenizers_mask_token(tmp_path: Path) -> None:
    from transformers import BertConfig, BertForMaskedLM

    folder = tmp_path / "bert"
    tokenizer = save_tokenizer(folder)
    BertForMaskedLM(BertConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=16, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=32)).save_pretrained(folder)
    bundle = ModelBundle(name=f"hf:{folder}", module=BertForMaskedLM.from_pretrained(folder),
                         example=(torch.zeros(1, 6, dtype=torch.long),), loss_fn=masked_lm_loss,
                         data_kind="masked-text")
    data = tmp_path / "t.txt"
    data.write_text(" ".join(SENTENCES))
    x, y = next(training_data(bundle, str(data), 16, (6,), 0, 0).batches)
    assert isinstance(x, torch.Tensor)
    chosen = y != -100
    assert chosen.any() and (x[chosen] == tokenizer.token_to_id("<mask>")).all()
    assert (x[~chosen] != tokenizer.token_to_id("<mask>")).all()


def test_held_out_windows_are_the_streams_last_share_and_never_drawn_for_training() -> None:
    size = 1000
    corpus = TextCorpus(tokens=np.arange(size, dtype=np.int32), source="positions", held_out=True)  # token = place
    start = size - int(size * HELD_OUT_SHARE)
    assert corpus.train_size == start == 950
    batches = corpus.batches(8, 16, seed=3)
    drawn = torch.cat([torch.cat(next(batches)) for _ in range(200)])  # type: ignore[arg-type]
    assert int(drawn.max()) < start and int(drawn.max()) >= start - 5  # up to the split, never past it
    held = corpus.held_out_batches(2, 2, 9)  # 4 windows of 10 consecutive tokens from the split's start
    assert [x[:, 0].tolist() for x, _ in held] == [[950, 960], [970, 980]]
    for x, y in held:
        assert torch.equal(x, x[:, :1] + torch.arange(9)) and torch.equal(y, x + 1)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(held, corpus.held_out_batches(2, 2, 9)))  # the same each time
    with pytest.raises(AutopartError, match=r"holds 5 windows of 10; --eval-batches 3 of 2 need 6"):
        corpus.held_out_batches(3, 2, 9)
    whole = TextCorpus(tokens=np.arange(size, dtype=np.int32), source="positions")
    assert whole.train_size == size  # without --eval-every, the whole stream is drawn as before


def test_eval_needs_data_with_a_held_out_split() -> None:
    module = torch.nn.Linear(4, 2)
    synthetic = ModelBundle(name="m:f", module=module, example=(torch.randn(2, 4),))
    with pytest.raises(AutopartError, match="--eval-every needs data with a held-out split.*synthetic data"):
        training_data(synthetic, None, 4, (4,), 0, 0, eval_batches=2)
    own = ModelBundle(name="m:f", module=module, example=(torch.randn(2, 4),),
                      loss_fn=lambda out, y: out.sum(), data=[(torch.randn(4, 4), torch.zeros(4))])
    with pytest.raises(AutopartError, match="the factory's own data, which has none"):
        training_data(own, None, 4, (4,), 0, 0, eval_batches=2)


@pytest.fixture(scope="module")
def plan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.conftest import ROOT

    out = tmp_path_factory.mktemp("eval") / "plan.json"
    made = run_cli_here("partition", str(ROOT / "profiles" / "gpt2-tiny-cpu-mb4.json"), "--stages", "2",
                        "--microbatches", "2", "-o", str(out))
    assert made.returncode == 0, made.stderr
    return out


def test_eval_flags_are_checked_before_any_rank_starts(plan: Path, tmp_path: Path) -> None:
    assert_one_line_error(run_cli_here("train", str(plan), "--model", "gpt2-tiny", "--eval-batches", "3"),
                          "--eval-batches 3 needs --eval-every N")
    assert_one_line_error(run_cli_here("train", str(plan), "--model", "gpt2-tiny", "--eval-every", "-1"),
                          "--eval-every must be >= 0, got -1")
    small = tmp_path / "small.txt"
    small.write_bytes(bytes(range(256)) * 20)  # 5,120 bytes: 256 held out, 3 windows of 65, not 16
    assert_one_line_error(run_cli_here("train", str(plan), "--model", "gpt2-tiny", "--data", str(small),
                                       "--eval-every", "1"),
                          "the held-out split (the last 5% of", "256 bytes) holds 3 windows of 65",
                          "--eval-batches 2 of 8 need 16")


def test_eval_is_refused_under_a_schedule_torchs_eval_cannot_run(tmp_path: Path) -> None:
    from tests.conftest import ROOT

    zbv = tmp_path / "zbv.json"
    assert run_cli_here("partition", str(ROOT / "profiles" / "gpt2-tiny-cpu-mb4.json"), "--stages", "2",
                        "--schedule", "ZBVZeroBubble", "--microbatches", "4", "-o", str(zbv)).returncode == 0
    assert_one_line_error(run_cli_here("train", str(zbv), "--model", "gpt2-tiny", "--eval-every", "1"),
                          "--eval-every under ZBVZeroBubble")


def test_a_resumed_run_evaluates_on_the_same_held_out_batches(model: tuple[ModelBundle, Any], tmp_path: Path) -> None:
    bundle, _ = model
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": s}) + "\n" for s in SENTENCES * 20))
    fresh = training_data(bundle, str(data), 2, (4,), seed=0, start_step=0, eval_batches=2)
    resumed = training_data(bundle, str(data), 2, (4,), seed=0, start_step=7, eval_batches=2)
    assert fresh.held_out is not None and resumed.held_out is not None and len(fresh.held_out) == 2
    for (x0, y0), (x1, y1) in zip(fresh.held_out, resumed.held_out):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)
    for _ in range(7):
        next(fresh.batches)
    assert all(torch.equal(a, b) for a, b in zip(next(fresh.batches), next(resumed.batches)))  # step 8 either way


class _Wrapper(torch.nn.Module):
    """A module around the model (as a rank may hand the data a stand-in for its model)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner


def test_the_vocabulary_is_found_through_a_module_that_wraps_the_model(tmp_path: Path) -> None:
    import dataclasses

    folder = tmp_path / "small"
    save_tokenizer(folder)
    bundle = save_llama(folder, vocab_size=10)
    data = tmp_path / "t.txt"
    data.write_text(" ".join(SENTENCES))
    with pytest.raises(AutopartError, match="vocab_size is 10"):
        text_corpus(dataclasses.replace(bundle, module=_Wrapper(bundle.module)), str(data))


def test_the_digits_hold_out_their_last_images() -> None:
    pytest.importorskip("sklearn")
    from autopart.run.data import Digits

    digits = Digits(held_out=True)
    n = len(digits.labels)
    assert (n, digits.train_size) == (1797, 1797 - 90) and Digits().train_size == n
    held = digits.held_out_batches(2, 8, (1, 8, 8))
    assert [tuple(x.shape) for x, _ in held] == [(8, 1, 8, 8)] * 2
    assert torch.equal(torch.cat([x for x, _ in held]), digits.images[1707:1723])
    assert torch.equal(torch.cat([y for _, y in held]), digits.labels[1707:1723])
    training = set()
    batches = digits.batches(64, (1, 8, 8), seed=0)
    for _ in range(40):
        x, _ = next(batches)
        training |= {bytes(img.numpy().tobytes()) for img in x}
    held_images = {bytes(img.numpy().tobytes()) for img in digits.images[1707:]}
    assert held_images - {bytes(img.numpy().tobytes()) for img in digits.images[:1707]}  # some are unique to it
    assert not (training & (held_images - {bytes(img.numpy().tobytes()) for img in digits.images[:1707]}))
    with pytest.raises(AutopartError, match=r"90 images\) holds fewer than --eval-batches 12 of 8"):
        digits.held_out_batches(12, 8, (1, 8, 8))


def test_a_large_text_file_is_read_up_to_the_budget_in_pieces_cut_at_newlines(model: tuple[ModelBundle, Any],
                                                                              tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A file three budgets long: at most the budget's bytes are read, in pieces that end at a newline, the
    document's end-of-text token only after the last; the stream is the budget's text tokenized (known answer)."""
    import autopart.run.tokens as tokens

    monkeypatch.setattr(tokens, "MAX_TEXT_BYTES", 200)
    monkeypatch.setattr(tokens, "_PIECE_BYTES", 64)
    _, tokenizer = model
    text = "\n".join(SENTENCES[i % len(SENTENCES)] for i in range(30))
    assert len(text.encode()) > 3 * 200
    big = tmp_path / "big.txt"
    big.write_text(text)
    _, read = tokens.read_documents(str(big))
    pieces = list(read)
    assert "".join(p for p, _ in pieces) == text[:200] and len(pieces) >= 4
    assert [ends for _, ends in pieces] == [False] * (len(pieces) - 1) + [True]
    assert all(p.endswith("\n") and len(p.encode()) <= 64 for p, _ in pieces[:-1])
    got = tokens.tokenize_for(tmp_path / "llama" / "tokenizer.json", str(big), None)
    assert got.tokens.tolist() == _stream(tokenizer, [text[:200]], eos=1) and got.documents == 1
    lines = tmp_path / "big.jsonl"  # JSON Lines stop before the line that would pass the budget
    lines.write_text("".join(json.dumps({"text": SENTENCES[i % len(SENTENCES)]}) + "\n" for i in range(30)))
    fit = [line for line in lines.read_text().splitlines(keepends=True)]
    whole = max(n for n in range(len(fit) + 1) if len("".join(fit[:n]).encode()) <= 200)
    _, read = tokens.read_documents(str(lines))
    assert [t for t, _ in read] == [SENTENCES[i % len(SENTENCES)] for i in range(whole)] and 0 < whole < 30

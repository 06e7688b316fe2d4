"""The memory model: one table of terms (autopart/core/memory.py) that every memory price derives from."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import autopart.core.costmodel as costmodel
from autopart.core.blocks import BlockCosts
from autopart.core.costmodel import Problem
from autopart.core.memory import MEMORY_TERMS, PART_SCALE, MemoryTerm
from autopart.core.training import CostModel
from autopart.formats.devices import Device


def _blocks(n: int, seed: int, skips: bool = True, ties: bool = True) -> BlockCosts:
    rng = np.random.default_rng(seed)
    ints = lambda lo, hi: rng.integers(lo, hi, n).astype(float).tolist()  # noqa: E731
    return BlockCosts.of(ints(1, 9), forward_ms=ints(0, 1), param_bytes=ints(0, 1000),
                         activation_bytes=ints(0, 5000), output_bytes=ints(1, 300), input_bytes=77,
                         skip_bytes=ints(0, 50) if skips else None,
                         ties=[(64.0, (0, n - 1))] if ties and n > 2 else ())


def _by_hand(p: Problem, s: int, i: int, j: int, recompute: bool) -> float:
    """Stage s's bytes from the definitions in docs/cost-model.md, written out term by term."""
    b, opt = p.blocks, p.model.optimizer_states
    in_flight = p.model.in_flight(s, p.k)
    skips = b.skip_bytes if b.skip_bytes is not None else np.zeros(b.n)
    received = b.input_bytes if i == 0 else b.output_bytes[i - 1] + skips[i - 1]
    mem = float(b.param_bytes[i:j + 1].sum()) * (2 + opt)
    mem += sum(size * (2 + opt) for size, users in b.ties
               if any(i <= u <= j for u in users) and not i <= users[0] <= j)
    acts = float(b.activation_bytes[i:j + 1].sum())
    if recompute:
        return mem + in_flight * received + acts
    return mem + in_flight * (acts + (skips[i - 1] if i > 0 else 0.0))


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 8), k=st.integers(1, 4), m=st.integers(1, 6), seed=st.integers(0, 10**6),
       schedule=st.sampled_from(["GPipe", "1F1B"]))
def test_every_stage_memory_is_the_sum_of_the_documented_terms(n: int, k: int, m: int, seed: int,
                                                                schedule: str) -> None:
    k = min(k, n)
    p = Problem(_blocks(n, seed), [Device("d")] * k, CostModel(schedule=schedule, microbatches=m))
    for s in range(k):
        for i in range(n):
            for j in range(i, n):
                plain, rc = p.memories(s, np.array([i]), np.array([j]))
                assert plain[0] == _by_hand(p, s, i, j, False)
                assert rc[0] == _by_hand(p, s, i, j, True)
                for recompute in (False, True):
                    cost = p.stage(s, i, j, recompute)
                    in_flight = p.model.in_flight(s, k)
                    assert cost.memory_bytes == (cost.static_bytes + in_flight * cost.activation_bytes
                                                 + cost.backward_extra_bytes)
                    assert cost.memory_bytes == _by_hand(p, s, i, j, recompute)


def test_a_new_term_is_one_entry_of_the_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """An extra term (a buffer of 1000 bytes per block, held per in-flight micro-batch) appears in every
    price: the memories, the partitioner's prefix sums, the plan's breakdown and so the split."""
    blocks = _blocks(6, 1, skips=False, ties=False)
    model = CostModel(schedule="GPipe", microbatches=4)
    devices = [Device("d")] * 2
    before = Problem(blocks, devices, model)
    extra = MemoryTerm("test buffer", "1000 bytes per block per micro-batch", "activation_bytes", "always",
                       per_block=lambda b, m: np.full(b.n, 1000.0))
    monkeypatch.setattr(costmodel, "MEMORY_TERMS", MEMORY_TERMS + (extra,))
    after = Problem(blocks, devices, model)
    i, j = np.array([1]), np.array([3])
    for rc in (0, 1):
        assert after.memories(0, i, j)[rc][0] - before.memories(0, i, j)[rc][0] == 4 * 3 * 1000
    assert after.plain_prefix(1)[-1] - before.plain_prefix(1)[-1] == 4 * 6 * 1000
    assert after.rc_prefix(1)[-1] - before.rc_prefix(1)[-1] == 4 * 6 * 1000
    cost, old = after.stage(0, 1, 3), before.stage(0, 1, 3)
    assert cost.activation_bytes - old.activation_bytes == 3 * 1000
    assert cost.memory_bytes - old.memory_bytes == 4 * 3 * 1000


def test_the_table_names_each_term_once_and_scales_by_its_field() -> None:
    names = [t.name for t in MEMORY_TERMS]
    assert len(set(names)) == len(names)
    assert {t.part for t in MEMORY_TERMS} <= set(PART_SCALE)
    assert all(t.doc for t in MEMORY_TERMS)


def test_a_problem_is_read_only() -> None:
    p = Problem(_blocks(5, 2), [Device("d")] * 2, CostModel())
    with pytest.raises(AttributeError, match="read-only"):
        p.k = 3
    for array in (p.limit, p.speed, p.compute_prefix(), p.plain_prefix(0), p.rc_prefix(1), p.blocks.param_bytes):
        with pytest.raises(ValueError):
            array[0] = 1.0
    source = np.array([1.0, 2.0])
    BlockCosts.of(source)
    source[0] = 5.0  # the caller's own array stays writable

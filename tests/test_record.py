"""record.py: a frozen dataclass read and written from its own fields, so a new field is one edit."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
from hypothesis import given, strategies as st

from autopart.errors import AutopartError
from autopart.formats.jsonfields import Fields
from autopart.formats.profile import LayerProfile
from autopart.formats.record import read_record, saved, write_record


@dataclass(frozen=True, kw_only=True)
class Sample:
    name: str
    count: int = field(metadata=saved(minimum=1))
    ratio: float | None = field(default=None, metadata=saved(omit=(None,)))
    shape: tuple[int, ...] = ()
    tags: tuple[str, ...] = field(default=(), metadata=saved(omit=((),)))
    flag: bool = False
    size_bytes: int = field(default=0, metadata=saved(required=True))
    source: str = field(default="made", metadata=saved(absent=""))
    double: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "double", 2 * self.count)


def test_fields_are_written_in_order_leaving_out_the_omitted_ones() -> None:
    sample = Sample(name="x", count=3, shape=(2, 4), size_bytes=7)
    assert json.dumps(write_record(sample)) == (
        '{"name": "x", "count": 3, "shape": [2, 4], "flag": false, "size_bytes": 7, "source": "made", "double": 6}')
    assert read_record(Sample, Fields(write_record(sample), "s")) == sample


def test_absent_keys_read_as_the_field_says() -> None:
    sample = read_record(Sample, Fields({"name": "x", "count": 1, "size_bytes": 0, "double": 99}, "s"))
    assert sample == Sample(name="x", count=1, source="") and sample.double == 2  # derived, never read


@pytest.mark.parametrize("data, message", [
    ({"count": 1, "size_bytes": 0}, "s: missing field 'name'"),
    ({"name": "x", "size_bytes": 0}, "s: missing field 'count'"),
    ({"name": "x", "count": 1}, "s: missing field 'size_bytes'"),  # required although it has a default
    ({"name": "x", "count": 0, "size_bytes": 0}, "s: count is 0, must be >= 1"),
    ({"name": "x", "count": 1, "size_bytes": 0, "ratio": "1"}, "s: ratio must be a number, got '1'"),
    ({"name": "x", "count": 1, "size_bytes": 0, "shape": [2, -1]}, "s: shape[1] must be an integer >= 0, got -1"),
    ({"name": 5, "count": 1, "size_bytes": 0}, "s: name must be a string, got 5"),
])
def test_bad_values_are_refused_naming_the_field(data: dict[str, object], message: str) -> None:
    with pytest.raises(AutopartError) as info:
        read_record(Sample, Fields(data, "s"))
    assert str(info.value) == message


def test_a_field_of_a_type_it_cannot_read_must_be_given() -> None:
    @dataclass(frozen=True)
    class Nested:
        inner: Sample

    with pytest.raises(TypeError, match="inner"):
        read_record(Nested, Fields({}, "n"))
    inner = Sample(name="x", count=1)
    assert read_record(Nested, Fields({}, "n"), inner=inner) == Nested(inner)
    assert write_record(Nested(inner))["inner"] == write_record(inner)


ms = st.floats(min_value=0, max_value=1e6, allow_nan=False)
size = st.integers(min_value=0, max_value=2**40)


@given(st.builds(LayerProfile, name=st.text(min_size=1, max_size=5), forward_ms=ms, backward_ms=ms,
                 param_bytes=size, activation_bytes=size, output_bytes=size, forward_iqr_ms=ms,
                 input_grad_ms=st.none() | ms, cuda_peak_bytes=st.none() | size, skip_bytes=size,
                 optimizer_ms_by_name=st.lists(st.tuples(st.sampled_from(["adamw", "sgd"]), ms), max_size=2,
                                               unique_by=lambda pair: pair[0]).map(tuple),
                 same_as=st.text(max_size=3)))
def test_a_layer_survives_json(layer: LayerProfile) -> None:
    data = json.loads(json.dumps(layer.to_dict()))
    assert LayerProfile.from_dict(data, "layers[0]") == layer
    assert ("skip_bytes" in data) == (layer.skip_bytes != 0) and ("same_as" in data) == (layer.same_as != "")

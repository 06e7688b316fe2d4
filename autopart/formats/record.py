"""A frozen dataclass read from and written to one JSON object, field by field, from its own fields.

Each record's fields say how they are saved: the type in the annotation (``str``, ``float``, ``int``,
``bool``, ``X | None``, ``tuple[int, ...]``, ``tuple[str, ...]``, and ``tuple[tuple[str, float], ...]``
saved as a JSON object of name: number), whether the file must hold it (a field without a default is
required), and in the field's ``metadata`` (:func:`saved`) the smallest value it may have, the values
written by leaving the key out, and the value an absent key reads as when that is not the dataclass's
default. A new field is one edit: the field itself.

    write_record(layer)                   # {"name": ..., "forward_ms": ..., ...}, in field order
    read_record(LayerProfile, Fields(obj, "profile 'p.json': layers[3]"))

Errors are :class:`autopart.formats.jsonfields.Fields`'s, naming the file and the field.
"""
from __future__ import annotations

import dataclasses
from dataclasses import MISSING, dataclass
from typing import Any, Mapping, TypeVar

from autopart.errors import AutopartError
from autopart.formats.jsonfields import Fields

__all__ = ["saved", "read_record", "write_record"]

T = TypeVar("T")


class _Unset:
    """No value given (``dataclasses.MISSING`` cannot be a dataclass field's default)."""


UNSET: Any = _Unset()


@dataclass(frozen=True)
class Saved:
    """How one field is saved (the ``"autopart"`` entry of a dataclass field's metadata)."""

    minimum: float = 0
    """The smallest number the file may hold for it (numbers and integers, and each item of a list)."""
    omit: tuple[Any, ...] = ()
    """Values written by leaving the key out (compared with ``==``)."""
    absent: Any = UNSET
    """What a missing key reads as, when not the dataclass's default; a field with one is optional."""
    required: bool = False
    """The file must hold it even though the dataclass has a default."""


def saved(*, minimum: float = 0, omit: tuple[Any, ...] = (), absent: Any = UNSET,
          required: bool = False) -> dict[str, Saved]:
    """Metadata for ``dataclasses.field(metadata=...)``: how the field is saved (see :class:`Saved`)."""
    return {"autopart": Saved(minimum=minimum, omit=omit, absent=absent, required=required)}


def _saved(fld: dataclasses.Field[Any]) -> Saved:
    found = fld.metadata.get("autopart")
    return found if isinstance(found, Saved) else Saved()


def _type(fld: dataclasses.Field[Any]) -> str:
    """The annotation as written (the formats use ``from __future__ import annotations``)."""
    return fld.type if isinstance(fld.type, str) else getattr(fld.type, "__name__", str(fld.type))


def _absent(fld: dataclasses.Field[Any]) -> Any:
    """What the field reads as when its key is missing; MISSING when it is required."""
    spec = _saved(fld)
    if spec.required:
        return MISSING
    if spec.absent is not UNSET:
        return spec.absent
    if fld.default_factory is not MISSING:
        return fld.default_factory()
    return fld.default


def _pairs(f: Fields, key: str, absent: Any) -> Any:
    """A JSON object of name: number (each finite and >= 0) as a tuple of pairs, in the file's order."""
    value = f.obj.get(key)
    if value is None:
        return absent
    if not isinstance(value, Mapping):
        unit = "ms" if "_ms" in key else "number"
        raise AutopartError(f"{f.at(key)} must be an object of name: {unit}, got {value!r}")
    inner = Fields(value, f.at(key))
    return tuple((str(name), float(inner.number(str(name)))) for name in value)


def _strings(f: Fields, key: str, required: bool, absent: Any) -> Any:
    if not required and f.obj.get(key) is None:
        return absent
    return tuple(str(item) for item in f.array(key, required))


def read_field(f: Fields, fld: dataclasses.Field[Any]) -> Any:
    """One field's value from the object ``f`` reads, checked against its type and :class:`Saved`."""
    key, kind, spec = fld.name, _type(fld), _saved(fld)
    absent = _absent(fld)
    required = absent is MISSING
    default = None if required else absent
    minimum = spec.minimum
    if kind in ("str", "str | None"):
        return f.string(key, required, default)
    if kind in ("float", "float | None"):
        return f.number(key, required, default, minimum=minimum)
    if kind in ("int", "int | None"):
        return f.integer(key, required, default, minimum=int(minimum))
    if kind == "bool":
        return bool(f.obj.get(key, default))
    if kind == "tuple[int, ...]":
        if not required and f.obj.get(key) is None:
            return default
        return tuple(f.int_list(key, required, minimum=int(minimum)))
    if kind == "tuple[str, ...]":
        return _strings(f, key, required, default)
    if kind == "tuple[tuple[str, float], ...]":
        return _pairs(f, key, default)
    raise TypeError(f"{key}: a {kind} field is not read generically; pass its value to read_record")


def read_record(cls: type[T], f: Fields, **given: Any) -> T:
    """Build ``cls`` from the object ``f`` reads, field by field in declaration order; ``given`` supplies
    fields read another way (nested records, cross-checked values). Fields the constructor does not take
    (``init=False``: derived, written for readers) are not read."""
    values = dict(given)
    for fld in dataclasses.fields(cls):  # type: ignore[arg-type]
        if fld.init and fld.name not in values:
            values[fld.name] = read_field(f, fld)
    return cls(**values)


def _json(value: Any, kind: str) -> Any:
    if kind == "tuple[tuple[str, float], ...]":
        return dict(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return write_record(value)
    if isinstance(value, (tuple, list)):
        return [_json(item, "") for item in value]
    return value


def write_record(record: Any, **given: Any) -> dict[str, Any]:
    """``record``'s fields as a JSON object, in declaration order, leaving out each field whose value is one
    of its :attr:`Saved.omit`; tuples become lists and nested records objects. ``given`` supplies the JSON
    of fields written another way."""
    data: dict[str, Any] = {}
    for fld in dataclasses.fields(record):
        value = getattr(record, fld.name)
        if any(value == empty for empty in _saved(fld).omit):
            continue
        data[fld.name] = given[fld.name] if fld.name in given else _json(value, _type(fld))
    return data

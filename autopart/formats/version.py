"""Which files this autopart can read: a format's schema version and the features a file needs.

Every file names its format and version (``"schema": "autopart.plan/1"``) and may list ``"features"``:
the changes since that version that a reader must understand to read the file correctly (a field whose
absence an older reader would misread). A field that older readers may safely ignore needs no feature.
A reader refuses, with one line, a file of a newer version of its format or one that needs a feature it
does not know, instead of misreading it:

    plan 'p.json': made by a newer autopart: needs features ['stage-groups'] (this autopart knows none)
"""
from __future__ import annotations

from autopart.errors import AutopartError
from autopart.formats.jsonfields import Fields

__all__ = ["check_version"]


def check_version(f: Fields, expected: str, known: frozenset[str]) -> tuple[str, tuple[str, ...]]:
    """The file's ``schema`` and ``features`` once checked: ``schema`` must be ``expected`` (``family/N``; a
    later version of the family is refused as made by a newer autopart) and every feature must be in
    ``known``."""
    family, _, version = expected.rpartition("/")
    schema: str = f.string("schema")
    if schema != expected:
        later = schema.removeprefix(f"{family}/")
        if schema.startswith(f"{family}/") and later.isdigit() and int(later) > int(version):
            raise AutopartError(f"{f.where}: made by a newer autopart: schema is {schema!r}, this autopart reads "
                                f"{expected!r}")
        raise AutopartError(f"{f.where}: schema is {schema!r}, expected {expected!r}")
    features = f.array("features", required=False)
    for i, name in enumerate(features):
        if not isinstance(name, str) or not name:
            raise AutopartError(f"{f.at('features')}[{i}] must be a feature's name, got {name!r}")
    unknown = sorted(set(features) - known)
    if unknown:
        knows = f"knows {sorted(known)}" if known else "knows none"
        raise AutopartError(f"{f.where}: made by a newer autopart: needs features {unknown} (this autopart {knows})")
    return schema, tuple(features)

"""The formats are written from their dataclasses byte for byte as before, and carry a version (``schema``)
and ``features`` that an older autopart refuses with one line instead of misreading the file.

The golden files were written by autopart before the formats were driven by their dataclasses:
``golden/profile-every-field.json`` (``json.dumps(profile.to_dict())`` of a profile that sets every optional
field) and ``golden/plan-gpt2-tiny-search.json`` (``autopart partition profiles/gpt2-tiny-cpu-mb4.json
--stages 2 --global-batch 8 --microbatches auto --schedule auto --bandwidth 1GB/s``, with runners-up).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from autopart.errors import AutopartError
from autopart.formats.plan import Plan
from autopart.formats.profile import Profile
from conftest import ROOT, assert_one_line_error, run_cli_here

GOLDEN = Path(__file__).resolve().parent / "golden"
SHIPPED = sorted((ROOT / "profiles").glob("*.json"))
NEWER = "made by a newer autopart"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_profiles_load_and_save_byte_for_byte(path: Path, tmp_path: Path) -> None:
    saved = Profile.from_json(path).to_json(tmp_path / path.name)
    assert saved.read_bytes() == path.read_bytes()


def test_every_optional_profile_field_is_written_as_before() -> None:
    text = (GOLDEN / "profile-every-field.json").read_text().strip()
    profile = Profile.from_dict(json.loads(text))
    saved = profile.to_dict()  # a file from before precisions: its float16 reads as fp16-mixed, which is saved
    assert (saved.pop("features"), saved.pop("precision")) == (["precision"], "fp16-mixed")
    assert json.dumps(saved) == text
    assert profile.ties[0].params == ("a.w", "b.w") and profile.batchnorm == "micro"
    assert profile.layers[0].optimizer_ms_by_name == (("adamw", 0.5), ("sgd", 0.125))
    assert profile.by_microbatch_size[0][0] == 4 and profile.layers[1].same_as == "a"


def test_a_plan_made_today_is_the_plan_made_before(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    golden = GOLDEN / "plan-gpt2-tiny-search.json"
    monkeypatch.chdir(ROOT)
    made = tmp_path / "plan.json"
    result = run_cli_here("partition", "profiles/gpt2-tiny-cpu-mb4.json", "--stages", "2", "--global-batch", "8",
                          "--microbatches", "auto", "--schedule", "auto", "--bandwidth", "1GB/s", "-o", str(made))
    assert result.returncode == 0, result.stderr
    assert made.read_bytes() == golden.read_bytes()
    plan = Plan.from_json(golden)
    assert plan.runners_up and plan.features == ()
    assert plan.to_json(tmp_path / "again.json").read_bytes() == golden.read_bytes()


def _with(path: Path, **changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    data.update(changes)
    return data


def _profile_data(**changes: Any) -> dict[str, Any]:
    return _with(ROOT / "profiles" / "gpt2-tiny-cpu-mb4.json", **changes)


def _plan_data(**changes: Any) -> dict[str, Any]:
    return _with(GOLDEN / "plan-gpt2-tiny-search.json", **changes)


@pytest.mark.parametrize("kind", ["profile", "plan"])
def test_a_file_needing_an_unknown_feature_is_refused_with_one_line(kind: str, tmp_path: Path) -> None:
    data = (_profile_data if kind == "profile" else _plan_data)(features=["stage-groups", "fp8-times"])
    path = tmp_path / f"{kind}.json"
    path.write_text(json.dumps(data))
    args = ["partition", str(path), "--stages", "2"] if kind == "profile" else ["simulate", str(path)]
    known = ["data_parallel", "precision", "split_backward"] if kind == "plan" else ["precision", "split_backward"]
    assert_one_line_error(run_cli_here(*args), f"{kind} {str(path)!r}: {NEWER}: needs features "
                          f"['fp8-times', 'stage-groups'] (this autopart knows {known})")


@pytest.mark.parametrize("kind", ["profile", "plan"])
def test_a_newer_schema_version_is_refused_as_newer(kind: str) -> None:
    data = (_profile_data if kind == "profile" else _plan_data)(schema=f"autopart.{kind}/2")
    reader = Profile.from_dict if kind == "profile" else Plan.from_dict
    with pytest.raises(AutopartError, match=f"{NEWER}: schema is 'autopart.{kind}/2', this autopart reads "
                                            f"'autopart.{kind}/1'"):
        reader(data)


@pytest.mark.parametrize("features, message", [
    ("x", "features must be a list"),
    ([3], "features[0] must be a feature's name, got 3"),
    ([""], "features[0] must be a feature's name, got ''"),
])
def test_a_malformed_feature_list_is_refused(features: Any, message: str) -> None:
    with pytest.raises(AutopartError) as info:
        Plan.from_dict(_plan_data(features=features), "plan 'p.json'")
    assert message in str(info.value)


def test_an_empty_feature_list_reads_as_none_and_is_not_written() -> None:
    profile = Profile.from_dict(_profile_data(features=[]))
    assert profile.features == () and "features" not in profile.to_dict()
    assert Profile.from_dict(_profile_data()) == profile


def test_known_features_are_kept_on_saving(monkeypatch: pytest.MonkeyPatch) -> None:
    """A file needing only features this autopart knows loads, and saving it keeps them (right after schema)."""
    import autopart.formats.plan as plan_format
    monkeypatch.setattr(plan_format, "PLAN_FEATURES", frozenset({"stage-groups"}))  # an autopart that knows it
    plan = Plan.from_dict(_plan_data(features=["stage-groups"]))
    assert plan.features == ("stage-groups",)
    assert list(plan.to_dict())[:2] == ["schema", "features"] and plan.to_dict()["features"] == ["stage-groups"]

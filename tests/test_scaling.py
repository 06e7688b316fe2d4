from __future__ import annotations

import pytest

from autopart.formats.profile import LayerProfile, Profile
from autopart.core.scaling import fit_curve, scale_profile


def _profile(times: dict[int, list[float]]) -> Profile:
    sizes = sorted(times)

    def layers(b: int) -> tuple[LayerProfile, ...]:
        return tuple(LayerProfile(name=f"b{i}", forward_ms=t / 3, backward_ms=2 * t / 3, param_bytes=100,
                                  activation_bytes=10 * b, output_bytes=4 + 2 * b) for i, t in enumerate(times[b]))

    return Profile(model="m", device="cpu", dtype="float32", microbatch_size=sizes[0], sample_shape=(sizes[0], 8),
                   torch="2.13.0", layers=layers(sizes[0]), input_bytes=8 * sizes[0],
                   by_microbatch_size=tuple((b, layers(b)) for b in sizes[1:]))


def test_affine_times_are_recovered() -> None:
    # 3 ms fixed per micro-batch plus 1.5 ms per sample
    profile = _profile({b: [3 + 1.5 * b, 6 + 3 * b] for b in (1, 2, 4, 8)})
    scaled, how = scale_profile(profile, 16)
    assert scaled.layers[0].forward_ms + scaled.layers[0].backward_ms == pytest.approx(27.0, rel=1e-3)
    assert scaled.layers[1].activation_bytes == 160 and scaled.layers[1].output_bytes == 36
    assert scaled.param_bytes == profile.param_bytes and scaled.microbatch_size == 16
    assert "curve_fit" in how and "outside" in how


def test_measured_sizes_are_used_as_measured() -> None:
    profile = _profile({1: [1.0], 4: [3.0]})
    scaled, how = scale_profile(profile, 4)
    assert scaled.layers == profile.sizes()[4] and how == "measured at micro-batch size 4"
    assert scale_profile(profile, 1) == (profile, "measured")


def test_one_size_is_scaled_linearly_and_says_so() -> None:
    scaled, how = scale_profile(_profile({2: [4.0]}), 6)
    assert scaled.step_ms == pytest.approx(12.0) and "assuming" in how


def test_power_fit() -> None:
    a, c, p = fit_curve([1, 2, 4, 8, 16], [1 + 2 * b ** 1.2 for b in (1, 2, 4, 8, 16)])
    assert (a, c, p) == pytest.approx((1.0, 2.0, 1.2), rel=1e-4)


def test_round_trip_keeps_every_size(tmp_path: object) -> None:
    from pathlib import Path

    profile = _profile({b: [1.0 + b] for b in (1, 2, 4)})
    path = profile.to_json(Path(str(tmp_path)) / "p.json")
    assert Profile.from_json(path) == profile and list(Profile.from_json(path).sizes()) == [1, 2, 4]

"""difference_map: sign, units, per-channel sums, smoothing and shape checks."""

from __future__ import annotations

import numpy as np
import pytest

from phenotwin.pipeline.heatmap import difference_map


@pytest.fixture
def pair():
    rng = np.random.default_rng(3)
    source = rng.uniform(-1, 1, (3, 24, 20)).astype(np.float32)
    translated = np.clip(source + rng.normal(0, 0.3, source.shape), -1, 1).astype(np.float32)
    return source, translated


def test_absolute_map_is_half_the_absolute_difference(pair):
    source, translated = pair
    heat = difference_map(source, translated)
    assert not heat.signed
    assert heat.per_channel.shape == source.shape and heat.total.shape == source.shape[1:]
    assert heat.per_channel.dtype == np.float32 and heat.total.dtype == np.float32
    np.testing.assert_allclose(heat.per_channel, np.abs(translated - source) / 2, atol=1e-6)
    assert (heat.per_channel >= 0).all()


def test_signed_map_keeps_the_direction(pair):
    source, translated = pair
    signed = difference_map(source, translated, signed=True)
    absolute = difference_map(source, translated)
    assert signed.signed
    np.testing.assert_allclose(signed.per_channel, (translated - source) / 2, atol=1e-6)
    assert (signed.per_channel < 0).any() and (signed.per_channel > 0).any()
    np.testing.assert_allclose(np.abs(signed.per_channel), absolute.per_channel, atol=1e-6)
    # swapping the images flips the sign, not the magnitude
    swapped = difference_map(translated, source, signed=True)
    np.testing.assert_allclose(swapped.per_channel, -signed.per_channel, atol=1e-6)
    # signed totals can cancel between channels; absolute totals cannot
    assert (np.abs(signed.total) <= absolute.total + 1e-6).all()
    assert (np.abs(signed.total) < absolute.total - 1e-3).any()


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("sigma", [0.0, 1.5])
def test_total_is_the_sum_over_channels(pair, signed, sigma):
    heat = difference_map(*pair, signed=signed, sigma=sigma)
    np.testing.assert_allclose(heat.per_channel.sum(axis=0), heat.total, atol=1e-5)


def test_units_are_halves_of_the_model_range():
    source = np.full((2, 16, 16), -1.0, np.float32)
    translated = source.copy()
    translated[0, 4, 5] = 1.0  # from black to white: the whole model range, 2 units
    translated[1, 8, 8] = -0.5  # a quarter of the range
    heat = difference_map(source, translated)
    assert heat.per_channel[0, 4, 5] == pytest.approx(1.0)
    assert heat.per_channel[1, 8, 8] == pytest.approx(0.25)
    assert heat.total[4, 5] == pytest.approx(1.0) and heat.total[8, 8] == pytest.approx(0.25)
    assert heat.total.sum() == pytest.approx(1.25)
    signed = difference_map(translated, source, signed=True)
    assert signed.per_channel[0, 4, 5] == pytest.approx(-1.0)


def test_identical_images_give_a_zero_map(pair):
    source, _ = pair
    heat = difference_map(source, source.copy(), sigma=2.0)
    assert not heat.total.any()


def test_smoothing_spreads_an_isolated_pixel_but_keeps_its_mass():
    source = np.zeros((1, 33, 33), np.float32)
    translated = source.copy()
    translated[0, 16, 16] = 1.6
    sharp = difference_map(source, translated)
    smooth = difference_map(source, translated, sigma=2.0)
    assert sharp.total.max() == pytest.approx(0.8)
    assert smooth.total.max() < 0.25 * sharp.total.max()
    assert np.unravel_index(smooth.total.argmax(), smooth.total.shape) == (16, 16)
    assert smooth.total.sum() == pytest.approx(sharp.total.sum(), rel=0.02)
    assert (smooth.total > 0.01 * smooth.total.max()).sum() > 9  # it did spread
    # more smoothing, lower peak
    assert difference_map(source, translated, sigma=4.0).total.max() < smooth.total.max()


def test_smoothing_prefers_a_coherent_change_over_scattered_noise():
    rng = np.random.default_rng(0)
    source = np.zeros((1, 64, 64), np.float32)
    translated = source.copy()
    translated[0, 20:30, 20:30] = 0.4  # a cell-sized change
    noise = rng.random((64, 64)) < 0.01  # scattered single pixels, each larger
    translated[0][noise & (translated[0] == 0)] = 1.0
    sharp = difference_map(source, translated).total
    smooth = difference_map(source, translated, sigma=2.0).total
    assert sharp[25, 25] < sharp.max()  # unsmoothed, a noise pixel is the hottest
    peak = np.unravel_index(smooth.argmax(), smooth.shape)
    assert 20 <= peak[0] < 30 and 20 <= peak[1] < 30  # smoothed, the change is


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ((2, 16, 16), (2, 16, 15)),
        ((2, 16, 16), (1, 16, 16)),
        ((16, 16), (16, 16)),
        ((1, 2, 16, 16), (1, 2, 16, 16)),
    ],
)
def test_wrong_shapes_raise_value_error(a, b):
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        difference_map(np.zeros(a, np.float32), np.zeros(b, np.float32))


def test_inputs_are_not_modified(pair):
    source, translated = pair
    copies = source.copy(), translated.copy()
    difference_map(source, translated, signed=True, sigma=1.0)
    np.testing.assert_array_equal(source, copies[0])
    np.testing.assert_array_equal(translated, copies[1])

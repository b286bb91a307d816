"""Figure scales: a heatmap's colours do not split cells that are equal within seed noise, and the
learning curves' zoom cuts off nothing it draws."""
from __future__ import annotations

import numpy as np
import pytest

from analysis.figures import colour_limits, plateau_window


def test_heatmap_colours_span_at_least_the_seed_noise():
    # Two cells 0.10 pp apart with a seed std of 0.20 pp: min..max would make them the two ends
    # of the colour map; the range is ±2 std around their centre instead.
    low, high, note = colour_limits(np.array([[95.00, 95.10]]), np.array([[0.20, 0.20]]))
    assert (low, high) == pytest.approx((94.65, 95.45))
    assert (95.10 - 95.00) / (high - low) == pytest.approx(0.125)  # an eighth of the map apart
    assert note == "colour range ≥ ±2 seed std (0.20 pp) around the centre: cells within noise get close colours"


def test_heatmap_colours_keep_a_real_difference_at_the_ends():
    low, high, _ = colour_limits(np.array([[94.00, np.nan], [95.50, 95.00]]), np.array([[0.1, np.nan], [0.1, 0.3]]))
    assert (low, high) == pytest.approx((94.00, 95.50))  # 1.5 pp apart: more than the noise, min..max


def test_heatmap_with_one_seed_per_cell_says_it_has_no_noise_estimate():
    low, high, note = colour_limits(np.array([[95.00, 95.10]]), np.full((1, 2), np.nan))
    assert (low, high) == pytest.approx((95.00, 95.10))
    assert note.endswith("one seed per cell: no noise estimate, colour differences may be seed noise")


def test_the_zoomed_learning_curves_hold_everything_drawn_in_their_epochs():
    epochs = np.array([1, 2, 3, 4])
    # Epoch 2's band reaches down to 55 %: the old zoom (on the second half's means) cut it off.
    curves = [(epochs, np.array([0.30, 0.60, 0.90, 0.92]), np.array([0.0, 0.05, 0.02, 0.04])),
              (epochs, np.array([0.35, 0.70, 0.91, 0.93]), np.array([0.0, 0.0, 0.0, 0.0])),
              (np.array([]), np.array([]), np.array([]))]  # a curve with nothing logged
    x0, x1, y0, y1 = plateau_window(curves)
    assert (x0, x1) == (2, 4)
    assert (y0, y1) == pytest.approx((55 - 2.05, 96 + 2.05))
    for e, m, s in curves[:2]:
        shown = e >= x0
        assert np.all(100 * (m - s)[shown] >= y0) and np.all(100 * (m + s)[shown] <= y1)


def test_a_single_epoch_still_gets_a_window():
    x0, x1, y0, y1 = plateau_window([(np.array([1]), np.array([0.5]), np.array([0.0]))])
    assert (x0, x1) == (0.5, 1.5) and (y0, y1) == pytest.approx((49.9, 50.1))

"""Honest dead-token indicators: fixed directions, no max(A, 1 - A), stated step resolution."""
from __future__ import annotations

import numpy as np
import pytest

from duckling.analysis import metrics as A


def cloud(V=400, d=8, n_dead=60, dead_scale=0.1, offset=None, seed=0):
    rng = np.random.default_rng(seed)
    W = rng.normal(0, 1.0, (V, d))
    dead = np.arange(V) >= V - n_dead
    W[dead] *= dead_scale
    if offset is not None:
        W[dead] += offset
    return W.astype(np.float32), dead


def test_norm_is_read_small_means_dead_both_ways():
    W, dead = cloud(dead_scale=0.1)  # dead rows small: the stated direction works
    assert A.auroc(A.indicators(W, dead)["norm"], dead) == 1.0
    W, dead = cloud(dead_scale=10.0)  # dead rows large (as under AdamW): it fails, and says so
    assert A.auroc(A.indicators(W, dead)["norm"], dead) == 0.0


def test_pc1_orientation_is_label_free_and_follows_the_minority_tail():
    off = np.r_[5.0, np.zeros(7)]
    for sign in (1.0, -1.0):  # the cluster on either side: the same answer, whatever eigh's sign
        W, dead = cloud(dead_scale=0.1, offset=sign * off)
        s = A.indicators(W, dead)["pc1"]
        assert A.auroc(s, dead) == 1.0
        np.testing.assert_allclose(A.indicators(-W, dead)["pc1"], s, rtol=1e-4, atol=1e-4)


def test_cos_all_mean_direction_is_fixed():
    W, dead = cloud(dead_scale=0.1, offset=np.r_[3.0, np.zeros(7)])  # dead rows along the mean row
    assert A.auroc(A.indicators(W, dead)["cos_all_mean"], dead) > 0.95
    W2, dead2 = cloud(n_dead=60, dead_scale=0.1, offset=np.r_[-3.0, np.zeros(7)])
    W2[~dead2] += np.r_[6.0, np.zeros(7)]  # the mean row now points away from the dead rows
    assert A.auroc(A.indicators(W2, dead2)["cos_all_mean"], dead2) < 0.05  # not folded to > 0.5


def test_first_separable_reports_direction_grid_and_resolution():
    steps = np.array([0, 40, 80, 120, 160])
    a = np.array([0.5, 0.6, 0.85, 0.95, 0.99])
    r = A.first_separable(steps, a)
    assert (r["step"], r["after_step"], r["resolution"]) == (120, 80, "between step 80 and 120")
    assert A.first_separable(steps, a, opposite=True)["step"] is None
    assert A.first_separable(steps, 1 - a, opposite=True)["step"] == 120
    assert A.first_separable(steps, np.full(5, 0.95))["resolution"] == "already at step 0"


@pytest.mark.parametrize("key", sorted(A.LABEL_FREE))
def test_every_label_free_indicator_has_both_directions_stated(key):
    assert "=> dead" in A.LABEL_FREE[key] and "=> dead" in A.OPPOSITE[key]
    assert key not in A.LABEL_USING


def test_blind_directions_are_one_table_with_a_source_each():
    assert set(A.BLIND_DIRECTIONS) == set(A.LABEL_FREE) == set(A.OPPOSITE) == set(A.DIRECTION_SOURCE)
    for key, (direction, opposite, source) in A.BLIND_DIRECTIONS.items():
        assert (A.LABEL_FREE[key], A.OPPOSITE[key]) == (direction, opposite)
        assert source.split(":")[0] in ("literature", "calibration", "prior, no labels (issue 13)"), key
    assert "Magikarp" in A.DIRECTION_SOURCE["norm"]


def test_post_hoc_best_never_replaces_the_fixed_direction():
    from duckling.analysis import measures as M

    W, dead = cloud(dead_scale=10.0)  # dead rows large: "small norm" fails in its fixed direction
    a = A.auroc(A.indicators(W, dead)["norm"], dead)
    assert a == 0.0  # reported as is
    assert M.post_hoc(a, "norm") == (1.0, "large row norm => dead")  # the post-hoc reading, labelled apart

"""Sample scale, AUV and the filters (SPEC §3)."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import auvcore
from auvcore.scores import DELTA

finite_scales = st.lists(st.floats(0.0, 1.0), min_size=1, max_size=60)


def test_sample_scale_mean_sum_and_nan():
    S = np.array([[0.9, 0.2, 0.4, np.nan], [0.1, np.nan, np.nan, np.nan], [0.5, 0.3, np.nan, 0.6]])
    np.testing.assert_allclose(auvcore.sample_scale(S), [0.3, np.nan, 0.45])  # foreground 1..K-1 by default
    np.testing.assert_allclose(auvcore.sample_scale(S, reduction="sum"), [0.6, np.nan, 0.9])
    np.testing.assert_allclose(auvcore.sample_scale(S, classes=[0, 3]), [0.9, 0.1, 0.55])
    out = auvcore.sample_scale(torch.tensor(S))
    assert isinstance(out, torch.Tensor)
    with pytest.raises(ValueError, match="classes: indices \\[4\\]"):
        auvcore.sample_scale(S, classes=[4])
    with pytest.raises(ValueError, match="reduction"):
        auvcore.sample_scale(S, reduction="max")
    with pytest.raises(ValueError, match="S: expected 2-D"):
        auvcore.sample_scale(S[0])


@given(finite_scales)
def test_auv_formula(xs):
    x = np.array(xs)
    a = auvcore.auv(x)
    lg = np.log(x + DELTA)
    want = 1 - (lg - lg.min()) / (lg.max() - lg.min() + DELTA)
    np.testing.assert_allclose(a, want, atol=1e-12)
    assert ((a >= 0) & (a <= 1)).all()
    # the least diverse case is the most uncertain
    assert a[np.argmin(x)] == a.max()


def test_auv_nan_and_errors():
    a = auvcore.auv(np.array([0.5, np.nan, 0.9]))
    assert math.isnan(a[1]) and a[0] > a[2]
    with pytest.raises(ValueError, match="sample_scales: expected scales >= 0"):
        auvcore.auv(np.array([-0.1, 0.2]))
    with pytest.raises(ValueError, match="sample_scales: empty"):
        auvcore.auv(np.array([]))
    with pytest.raises(ValueError, match="Inf"):
        auvcore.auv(np.array([np.inf, 0.2]))


def test_per_class_auv_uses_only_cases_holding_the_class():
    S = np.array([[np.nan, 0.9, 0.2], [np.nan, 0.5, np.nan], [np.nan, 0.7, 0.8]])
    A = auvcore.auv(S)
    np.testing.assert_allclose(A[:, 1], auvcore.auv(S[:, 1]))
    assert math.isnan(A[1, 2]) and A[0, 2] == pytest.approx(1.0) and A[2, 2] == pytest.approx(0.0, abs=1e-7)


@given(st.lists(st.lists(st.floats(0.01, 1.0), min_size=3, max_size=3), min_size=2, max_size=40),
       st.integers(1, 7))
def test_accumulator_equals_one_call(rows, nbatch):
    S = np.array(rows)
    acc = auvcore.AUVAccumulator()
    ids = [f"case{i}" for i in range(len(S))]
    for chunk in np.array_split(np.arange(len(S)), min(nbatch, len(S))):
        acc.update([ids[i] for i in chunk], S[chunk])
    want = auvcore.auv(auvcore.sample_scale(S))
    got = acc.sample_auv()
    np.testing.assert_allclose([got[i] for i in ids], want, atol=0)
    np.testing.assert_allclose(acc.class_auv(), auvcore.auv(S), atol=0)


def test_accumulator_rejects_duplicates_and_shape_changes():
    acc = auvcore.AUVAccumulator()
    acc.update(["a", "b"], np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"case_ids: \['a'\] already added"):
        acc.update(["a"], np.ones((1, 3)))
    with pytest.raises(ValueError, match="expected 3 classes"):
        acc.update(["c"], np.ones((1, 4)))
    with pytest.raises(ValueError, match="2 ids for 1 rows"):
        acc.update(["c", "d"], np.ones((1, 3)))


@given(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=80), st.floats(0.01, 1.0))
def test_keep_mask_is_the_inverted_cdf_cut(xs, q):
    a = np.array(xs)
    keep = auvcore.keep_mask(a, q)
    # Q(q) = inf{v : q <= F(v)}, F the empirical CDF; keep iff a <= Q
    srt = np.sort(a)
    F = np.searchsorted(srt, srt, side="right") / len(a)
    cut = srt[np.argmax(F >= q - 1e-12)]
    np.testing.assert_array_equal(keep, a <= cut)
    assert keep.sum() >= math.floor(q * len(a) + 1e-9)  # at least the requested share is kept


def test_keep_mask_examples_and_errors():
    a = np.arange(20) / 19.0
    assert auvcore.keep_mask(a, 0.95).sum() == 19 and not auvcore.keep_mask(a, 0.95)[-1]
    assert auvcore.keep_mask(a, 0.90).sum() == 18
    assert auvcore.keep_mask(a, 1.0).all()
    assert auvcore.keep_mask(np.array([0.2, np.nan, 0.9]), 0.5).tolist() == [True, True, False]
    for bad in (0.0, 1.5, -0.2):
        with pytest.raises(ValueError, match="quantile: expected a value in \\(0, 1\\]"):
            auvcore.keep_mask(a, bad)
    assert isinstance(auvcore.keep_mask(torch.tensor(a)), torch.Tensor)


def test_keep_mask_per_class():
    A = np.array([[np.nan, 0.1, 0.9], [np.nan, 0.95, np.nan], [np.nan, 0.2, 0.1], [np.nan, 0.3, 0.2]])
    keep = auvcore.keep_mask_per_class(A, 0.75)
    # class 1 cut: 3rd of 4 -> 0.3 drops case 1; class 2 cut over (0.9, 0.1, 0.2): ceil(.75*3)=3rd -> 0.9 keeps all
    assert keep.tolist() == [True, False, True, True]
    keep = auvcore.keep_mask_per_class(A, 0.5, classes=[2])
    assert keep.tolist() == [False, True, True, True]

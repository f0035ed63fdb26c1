"""The checks every record stage shares (stages.base)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tensorline.engine.errors import DeadLetter
from tensorline.stages.base import check_finite

FLOATS = st.sampled_from(["float16", "float32", "float64"]).flatmap(
    lambda dtype: hnp.arrays(dtype, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=6),
                             elements=st.floats(width=np.dtype(dtype).itemsize * 8)))


@settings(max_examples=300, deadline=None)
@given(arr=FLOATS)
def test_check_finite_refuses_exactly_the_arrays_holding_nan_or_inf(arr: np.ndarray) -> None:
    bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
    if bad == 0:
        check_finite("r1", "tensor 'x'", arr)
        return
    with pytest.raises(DeadLetter) as caught:
        check_finite("r1", "tensor 'x'", arr)
    assert caught.value.reason == "non_finite"
    assert str(caught.value) == f"record r1: tensor 'x': {bad} of {arr.size} values are NaN or Inf"


def test_check_finite_passes_integer_tensors_and_huge_finite_floats() -> None:
    check_finite("r1", "x", np.arange(5))
    check_finite("r1", "x", np.full(1000, 6e4, np.float16))  # would overflow a float16 sum
    check_finite("r1", "x", np.full(4, np.finfo(np.float32).max, np.float32))

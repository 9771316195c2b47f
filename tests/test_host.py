"""Host buffers: a shape group is held once, from the loader through the solve."""

import jax
import numpy as np
import pytest

from hydraopt_jax._host import ALIGN, aligned_zeros, stack_modules, stacked_view, unstack


def _loader_like(num_modules=3, shape=(5, 4, 6)):
    buf = aligned_zeros((num_modules, *shape))
    buf[...] = np.arange(buf.size, dtype=np.float32).reshape(buf.shape)
    buf.flags.writeable = False
    return buf, [buf[i] for i in range(num_modules)]


def test_aligned_zeros_is_aligned_zero_and_contiguous():
    for shape in [(1,), (3, 5), (2, 7, 9)]:
        x = aligned_zeros(shape)
        assert x.ctypes.data % ALIGN == 0
        assert x.shape == shape and x.flags.c_contiguous and not x.any()


def test_consecutive_read_only_views_are_recognised_as_their_buffer():
    buf, parts = _loader_like()
    view = stacked_view(parts)
    assert view is not None and view.shape == buf.shape
    assert np.shares_memory(view, buf)
    np.testing.assert_array_equal(view, buf)


@pytest.mark.parametrize(
    "case", ["writable", "reordered", "subset_gap", "separate_arrays", "different_dtype"]
)
def test_anything_else_is_not_a_view(case):
    buf, parts = _loader_like()
    if case == "writable":
        parts = [np.array(p) for p in parts]
    elif case == "reordered":
        parts = parts[::-1]
    elif case == "subset_gap":
        parts = [parts[0], parts[2]]
    elif case == "separate_arrays":
        parts = [np.array(p) for p in parts]
        for p in parts:
            p.flags.writeable = False
    elif case == "different_dtype":
        parts = [parts[0], parts[1].astype(np.float64)]
    assert stacked_view(parts) is None


def test_stack_modules_equals_np_stack_with_and_without_take():
    buf, parts = _loader_like()
    np.testing.assert_array_equal(stack_modules(parts, np.float32), np.stack(parts))
    take = lambda x: x[[0, 2]]  # noqa: E731
    np.testing.assert_array_equal(
        stack_modules(parts, np.float32, take), np.stack([take(p) for p in parts])
    )
    writable = [np.array(p) for p in parts]
    out = stack_modules(writable, np.float32)
    writable[0][...] = -1  # the device array is a copy of writable inputs
    np.testing.assert_array_equal(out, buf)


def test_unstack_equals_indexing():
    x = jax.numpy.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    parts = unstack(x)
    assert len(parts) == 2
    for i, p in enumerate(parts):
        assert isinstance(p, jax.Array)
        np.testing.assert_array_equal(p, x[i])

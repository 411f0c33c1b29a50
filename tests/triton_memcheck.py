"""A bounds check for Triton kernels run by the interpreter (``TRITON_INTERPRET=1``): the CPU's
stand-in for compute-sanitizer's memcheck.

``bounds_checked(also=...)`` records, for each launch, the storage of every tensor argument (and
of the tensors ``also`` names: those a kernel reaches through a table of addresses), and checks
every load and store the kernel does: each address a mask lets through must lie inside one of
those tensors. An out-of-bounds access raises at once (the interpreter wraps it in an
``InterpreterError`` naming it), where the GPU would read a neighbour's bytes or fault later.
"""

from __future__ import annotations

import contextlib

import numpy as np
from triton.runtime import interpreter


class OutOfBounds(AssertionError):
    pass


def _span(tensor) -> tuple[int, int]:
    storage = tensor.untyped_storage()
    return storage.data_ptr(), storage.data_ptr() + storage.nbytes()


@contextlib.contextmanager
def bounds_checked(also=()):
    ranges: list[tuple[int, int]] = []
    fixed = [_span(t) for t in also]
    init_args = interpreter.GridExecutor._init_args_hst
    load = interpreter.InterpreterBuilder.create_masked_load
    store = interpreter.InterpreterBuilder.create_masked_store

    def recording_init(self, args_dev, kwargs):
        args_hst, kwargs_hst = init_args(self, args_dev, kwargs)
        ranges[:] = fixed + [_span(arg) for arg in [*args_hst, *kwargs_hst.values()] if hasattr(arg, "untyped_storage")]
        return args_hst, kwargs_hst

    def check(kind, ptrs, mask):
        addresses = np.asarray(ptrs.data, dtype=np.uint64)[np.asarray(mask.data, dtype=bool)]
        if addresses.size == 0:
            return
        width = np.dtype(interpreter._get_np_dtype(ptrs.get_element_ty())).itemsize
        inside = np.zeros(addresses.shape, dtype=bool)
        for begin, end in ranges:
            inside |= (addresses >= begin) & (addresses + width <= end)
        if not inside.all():
            bad = int(addresses[~inside][0])
            near = min(ranges, key=lambda r: min(abs(bad - r[0]), abs(bad - r[1])))
            raise OutOfBounds(f"{kind} of {int((~inside).sum())} address(es) outside every tensor argument, "
                              f"e.g. {bad - near[1]:+d} bytes from the end of a {near[1] - near[0]}-byte tensor")

    def checked_load(self, ptrs, mask, other, *rest):
        check("load", ptrs, mask)
        return load(self, ptrs, mask, other, *rest)

    def checked_store(self, ptrs, value, mask, *rest):
        check("store", ptrs, mask)
        return store(self, ptrs, value, mask, *rest)

    interpreter.GridExecutor._init_args_hst = recording_init
    interpreter.InterpreterBuilder.create_masked_load = checked_load
    interpreter.InterpreterBuilder.create_masked_store = checked_store
    try:
        yield
    finally:
        interpreter.GridExecutor._init_args_hst = init_args
        interpreter.InterpreterBuilder.create_masked_load = load
        interpreter.InterpreterBuilder.create_masked_store = store

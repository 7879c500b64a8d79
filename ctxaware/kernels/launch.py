"""Kernel launches with less host work than Triton's `JITFunction[grid](...)`.

Each JIT launch binds and specialises every argument, builds a string cache key and looks the compiled kernel up,
for our kernels' 40-50 arguments on every call. SF's forward+backward at 4k launches five kernels and is host-bound;
calling the compiled kernels directly took 9% off its host and wall time on an H100 (`benchmarks/kernel_launch.py`,
benchmarks/results/kernel_launch_h100.json). `direct_launch` keeps the compiled kernel of each specialisation under a
key computed from the same facts Triton specialises on (argument dtypes, 16-byte alignment of pointers, integers
equal to 1, divisible by 16 or beyond int32, constexpr values, launch options, device) and calls it directly after
the first launch, which still goes through Triton (compiling if needed). Under TRITON_INTERPRET=1 (`triton.jit` then
makes an interpreted function, which compiles nothing), and for a grid given as a function, every launch goes
through Triton.
"""

from __future__ import annotations

import torch


INT32 = (-(2**31), 2**31)


def _specialisation(value):
    """What Triton's compiled kernel depends on for a non-constexpr argument."""
    if isinstance(value, torch.Tensor):
        return value.dtype, value.data_ptr() % 16 == 0
    if type(value) is int:
        return int, value == 1, value % 16 == 0, INT32[0] <= value < INT32[1]
    if type(value) is float:
        return float
    return value  # bool, None: Triton specialises on the value


class DirectLaunch:
    """`kernel[grid](*args, **kwargs)` as for a `triton.jit` function, calling the compiled kernel directly once one
    exists for the call's specialisation."""

    def __init__(self, fn):
        self.fn = fn
        self.__name__ = getattr(fn, "__name__", type(fn).__name__)
        self._names = list(fn.arg_names)
        self._interpreted = not hasattr(fn, "params")
        self._constexpr = [] if self._interpreted else [param.is_constexpr for param in fn.params]
        self._compiled: dict[tuple, object] = {}

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if self._interpreted or callable(grid):
                return self.fn[grid](*args, **kwargs)
            values = (*args, *(kwargs[name] for name in self._names[len(args) :]))
            key = (
                torch.cuda.current_device(),
                *(v if constexpr else _specialisation(v) for v, constexpr in zip(values, self._constexpr)),
                *sorted((name, v) for name, v in kwargs.items() if name not in self._names),  # num_warps, ...
            )
            compiled = self._compiled.get(key)
            if compiled is None:
                self._compiled[key] = self.fn[grid](*args, **kwargs)
            else:
                compiled[tuple(grid) + (1,) * (3 - len(grid))](*values)

        return launch


def direct_launch(fn) -> DirectLaunch:
    """Decorator, above `@triton.jit`."""
    return DirectLaunch(fn)

"""Kernel launches with less host work than Triton's `JITFunction[grid](...)`.

Each JIT launch binds and specialises every argument, builds a string cache key and looks the compiled kernel up,
for our kernels' 40-50 arguments on every call. SF's forward+backward at 4k launches five kernels and is host-bound;
calling the compiled kernels directly took 9% off its host and wall time on an H100 (`benchmarks/kernel_launch.py`,
benchmarks/results/kernel_launch_h100.json). `direct_launch` keeps the compiled kernel of each specialisation under a
key computed from the same facts Triton specialises on (argument dtypes, 16-byte alignment of pointers, integers
equal to 1, divisible by 16 or beyond int32, constexpr values, launch options, device) and calls it directly after
the first launch, which still goes through Triton (compiling if needed). Under TRITON_INTERPRET=1 (`triton.jit` then
makes an interpreted function, which compiles nothing), for a grid given as a function and while torch.compile
traces, every launch goes through Triton.
"""

from __future__ import annotations

import operator

import torch


def _specialisation(value):
    """What Triton's compiled kernel depends on for a non-constexpr argument."""
    kind = type(value)
    if kind is int:
        # a constant 1; divisible by 16; int32, int64 or uint64
        return value == 1, not value & 15, -(2**31) <= value < 2**31, value < 2**63
    if kind is float:
        return float
    if isinstance(value, torch.Tensor):
        return value.dtype, not value.data_ptr() & 15
    return value  # bool, None: Triton specialises on the value


def _picker(indices: list[int]):
    """values -> the tuple of values[i] for i in indices (itemgetter, C-level, returns a bare value for one index)."""
    if len(indices) > 1:
        return operator.itemgetter(*indices)
    return lambda values: tuple(values[i] for i in indices)


class DirectLaunch:
    """`kernel[grid](*args, **kwargs)` as for a `triton.jit` function, calling the compiled kernel directly once one
    exists for the call's specialisation. The key is built with as little Python as possible: it is host time on
    every launch (half the earlier key's, benchmarks/results/launch_key_host_cpu.json)."""

    def __init__(self, fn):
        self.fn = fn
        self.__name__ = getattr(fn, "__name__", type(fn).__name__)
        self._names = tuple(fn.arg_names)
        self._name_set = frozenset(self._names)
        self._interpreted = not hasattr(fn, "params")
        constexpr = [] if self._interpreted else [param.is_constexpr for param in fn.params]
        self._constexprs = _picker([i for i, flag in enumerate(constexpr) if flag])  # keyed by value
        self._others = _picker([i for i, flag in enumerate(constexpr) if not flag])  # keyed by _specialisation
        self._compiled: dict[tuple, object] = {}

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if self._interpreted or callable(grid) or torch.compiler.is_compiling():  # torch.compile traces Triton's
                return self.fn[grid](*args, **kwargs)  # own launches of user kernels, not this one
            values = args + tuple(map(kwargs.__getitem__, self._names[len(args) :]))
            options = tuple(sorted(item for item in kwargs.items() if item[0] not in self._name_set))  # num_warps...
            key = (
                torch.cuda.current_device(),
                options,
                self._constexprs(values),
                *map(_specialisation, self._others(values)),
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

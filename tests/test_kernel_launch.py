"""`direct_launch`: the first launch of each specialisation goes through Triton, later ones call the compiled kernel
with every argument in the kernel's parameter order; anything Triton specialises on gives a new compile. A fake JIT
function stands in for Triton's (the compiled path needs a GPU; tests/gpu runs the real kernels through it)."""

from types import SimpleNamespace

import pytest
import torch

from ctxaware.kernels import launch
from ctxaware.kernels.launch import direct_launch


class FakeJit:
    """Records launches through Triton (`jit`) and direct calls of the compiled kernels it returned (`direct`)."""

    def __init__(self, params):
        self.arg_names = [name for name, _ in params]
        self.params = [SimpleNamespace(name=name, is_constexpr=constexpr) for name, constexpr in params]
        self.jit, self.direct = [], []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.jit.append((grid, args, kwargs))
            number = len(self.jit)
            return FakeCompiled(lambda g, values: self.direct.append((number, g, values)))

        return run


class FakeCompiled:
    def __init__(self, record):
        self.record = record

    def __getitem__(self, grid):
        return lambda *values: self.record(grid, values)


@pytest.fixture
def kernel(monkeypatch):
    monkeypatch.setattr(launch.torch.cuda, "current_device", lambda: 0)
    return FakeJit([("X", False), ("n", False), ("scale", False), ("flag", False), ("D", True)])


def test_second_launch_calls_the_compiled_kernel_with_all_arguments_in_order(kernel):
    x = torch.zeros(64)
    wrapped = direct_launch(kernel)
    wrapped[(4,)](x, 32, 0.5, flag=True, D=64, num_warps=4)
    wrapped[(8, 2)](x, 48, 0.25, flag=True, D=64, num_warps=4)
    assert len(kernel.jit) == 1
    assert kernel.direct == [(1, (8, 2, 1), (x, 48, 0.25, True, 64))]


@pytest.mark.parametrize(
    "change",
    [
        dict(x=torch.zeros(64, dtype=torch.float16)),  # dtype
        dict(x=torch.zeros(65)[1:]),  # 4-byte offset: not 16-byte aligned
        dict(n=1, base_n=17),  # Triton turns an integer 1 into a constant (17: neither 1 nor divisible by 16)
        dict(n=40),  # not divisible by 16
        dict(n=2**31 + 16),  # int64
        dict(n=2**63 + 16, base_n=2**62 + 16),  # uint64 against int64
        dict(flag=False),
        dict(D=128),  # constexpr: a new value is a new kernel even where the integer facts agree
        dict(num_warps=8),  # launch option
    ],
    ids=["dtype", "alignment", "int_one", "int_div16", "int64", "uint64", "bool", "constexpr", "option"],
)
def test_what_triton_specialises_on_compiles_anew(kernel, change):
    change = dict(change)  # the parameter itself stays as collected
    call = dict(x=torch.zeros(64), n=change.pop("base_n", 32), flag=True, D=64, num_warps=4)
    wrapped = direct_launch(kernel)
    wrapped[(1,)](call["x"], call["n"], 0.5, flag=call["flag"], D=call["D"], num_warps=call["num_warps"])
    call |= change
    wrapped[(1,)](call["x"], call["n"], 0.75, flag=call["flag"], D=call["D"], num_warps=call["num_warps"])
    assert len(kernel.jit) == 2 and kernel.direct == []


def test_interpreted_functions_always_go_through_triton():
    interpreted = FakeJit([("X", False)])
    del interpreted.params  # Triton's interpreted functions have no `params`
    wrapped = direct_launch(interpreted)
    for _ in range(3):
        wrapped[(1,)](torch.zeros(4))
    assert len(interpreted.jit) == 3 and interpreted.direct == []


def test_a_grid_given_as_a_function_goes_through_triton(kernel):
    wrapped = direct_launch(kernel)
    for _ in range(2):
        wrapped[lambda meta: (4,)](torch.zeros(64), 32, 0.5, flag=True, D=64)
    assert len(kernel.jit) == 2 and kernel.direct == []


def test_launches_go_through_triton_while_torch_compile_traces(kernel, monkeypatch):
    monkeypatch.setattr(launch.torch.compiler, "is_compiling", lambda: True)
    wrapped = direct_launch(kernel)
    for _ in range(2):
        wrapped[(1,)](torch.zeros(64), 32, 0.5, flag=True, D=64)
    assert len(kernel.jit) == 2 and kernel.direct == []

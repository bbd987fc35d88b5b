"""fastddpm's operators in torch.library (namespace ``fastddpm``), and how each is defined.

`define` makes ``torch.ops.fastddpm.<name>`` from the parts an op module holds:

* ``reference``: the op in the eager reference (`fastddpm.reference`, with the noise contract's
  normals drawn from the key), whose signature gives the schema. float64 data, and devices
  without a kernel (MPS, XPU, …), run it;
* ``check``: the op's argument checks (`fastddpm.kernels.checks`), run once by every
  implementation and by the fake; it returns the images' dtype;
* ``cpu``: the launcher of the native kernel (`fastddpm._native`, where it was built);
* ``cuda``: the launcher of the Triton kernel (where Triton is installed);
* ``fake``: the outputs' shapes, for tracing;
* ``backward`` and ``setup_context``: autograd, for the ops that have one.

The operator is defined directly in a `torch.library.Library`: `torch.compile` keeps it as one
opaque node that calls the dispatcher, which picks the kernel by the tensors' device at run
time, so CPU tensors reach the native kernel and CUDA tensors the Triton one, compiled or not.
(`triton_op` instead replaced the op by its Python body under compile for every device, which
routed CPU tensors into Triton launches on a CUDA machine.)
"""

from __future__ import annotations

import functools
import inspect
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from fastddpm import options, solvers
from fastddpm.schedule import Coefficients

from . import checks

LIBRARY = torch.library.Library("fastddpm", "DEF")


def _load_native():
    """`fastddpm._native`, or None (with a warning) where it was not built or is stale."""
    try:
        from fastddpm import _native
    except ImportError as err:
        reason = str(err)
    else:
        built = _native.names()
        expected = {"rows": Coefficients.row_names(), "predictions": options.PREDICTIONS,
                    "variances": options.VARIANCES,
                    "model_dtypes": tuple(str(d).removeprefix("torch.") for d in options.MODEL_DTYPES),
                    "solver_rows": solvers.ROWS}
        stale = [k for k, v in expected.items() if tuple(built[k]) != v]
        if not stale:
            return _native
        reason = f"it was built for other {', '.join(stale)}; rebuild it (pip install .)"
    warnings.warn(f"fastddpm: the native CPU kernels are not available ({reason}); CPU ops run on the eager "
                  "reference. Reinstall fastddpm with a C++17 compiler to build them.", stacklevel=3)
    return None


native = _load_native()


@dataclass(frozen=True)
class Op:
    """An operator: ``default`` is ``torch.ops.fastddpm.<name>.default`` (the kernel for the
    tensors' device); ``reference`` runs the checked eager reference, with the same signature."""

    name: str
    default: torch._ops.OpOverload
    reference: Callable


def define(name: str, reference: Callable, check: Callable, fake: Callable, *, cpu: Callable | None,
           cuda: Callable | None, backward: Callable | None = None, setup_context: Callable | None = None,
           mutates: tuple[str, ...] = (), index: str = "t") -> Op:
    """Define ``fastddpm::<name>`` (see the module docstring for the parts). ``mutates``: the
    arguments it writes in place; ``index``: the argument whose values pick the table's columns."""
    params = list(inspect.signature(reference).parameters)
    at_t, at_table = params.index(index), params.index("table")

    def implementation(kernel: Callable | None, kernel_checks_t: bool):
        @functools.wraps(reference)  # torch reads the schema from the signature
        def run(*args):
            if check(*args) == torch.float64 or kernel is None:
                checks.timesteps_in_range(name, args[at_t], args[at_table].shape[1], index)
                return reference(*args)
            if not kernel_checks_t:
                checks.timesteps_in_range(name, args[at_t], args[at_table].shape[1], index)
            try:
                return kernel(*args)
            except ValueError as err:  # the native kernel's own checks (t's range)
                raise ValueError(f"fastddpm.{name}: {err}") from None

        return run

    def fake_outputs(*args):
        check(*args)
        return fake(*args)

    checked_reference = implementation(None, False)
    LIBRARY.define(name + torch.library.infer_schema(reference, mutates_args=mutates))
    LIBRARY.impl(name, checked_reference, "CompositeExplicitAutograd")
    LIBRARY.impl(name, implementation(cpu if native is not None else None, True), "CPU")
    if cuda is not None:
        LIBRARY.impl(name, implementation(cuda, False), "CUDA")
    torch.library.register_fake(f"fastddpm::{name}", fake_outputs, lib=LIBRARY)
    default = getattr(torch.ops.fastddpm, name).default
    if backward is not None:
        torch.library.register_autograd(default, backward, setup_context=setup_context, lib=LIBRARY)
    return Op(name, default, checked_reference)


# ---- shared by the launchers ---------------------------------------------------------------


def dense_rows(x: Tensor) -> bool:
    """True when each x[b] is one dense row-major block (at any batch stride)."""
    expected = 1
    for size, stride in zip(reversed(x.shape[1:]), reversed(x.stride()[1:])):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def batch_stride(x: Tensor) -> int:
    """Elements from one sample to the next (a single sample's own size: its stride can be anything)."""
    return x.stride(0) if x.shape[0] > 1 else per_sample_numel(x)


def per_sample_numel(x: Tensor) -> int:
    n = 1
    for s in x.shape[1:]:
        n *= s
    return n


def like(x: Tensor, *args) -> Tensor:
    """A fake output: a contiguous tensor like the first argument."""
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def per_sample(x: Tensor, *args) -> Tensor:
    """A fake output: float32 [B] on the first argument's device."""
    return x.new_empty((x.shape[0],), dtype=torch.float32)

"""fastddpm's fused operators, ``torch.ops.fastddpm.*``: one module an op (installed as
``fastddpm.kernels``).

Each op module holds the whole op: its argument checks, the eager reference it falls back to,
the launcher of its native C++ kernel (``native/<op>.cpp``, built into ``fastddpm._native``),
its Triton kernel and launcher, and its `torch.library` definition with fake and autograd —
`q_sample`, `reverse_step`, `simple_loss`, `vlb_terms`, `solver_step`. `library` is how an op is defined,
`checks` the checks they share, `triton_common` what their Triton kernels share. README.md is
the kernels' ABI and the checklist for adding an op.
"""

from . import q_sample, reverse_step, simple_loss, solver_step, vlb_terms  # noqa: F401 (defines the operators)
from .library import native
from .triton_common import HAS_TRITON

__all__ = ["HAS_TRITON", "native", "q_sample", "reverse_step", "simple_loss", "solver_step", "vlb_terms"]

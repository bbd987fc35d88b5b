"""Triton kernels of the fused ops (CUDA; the Triton interpreter runs them on the CPU for tests).

One module per op, each holding its @triton.jit kernel and its host launcher (see
``kernels/README.md`` for the ABI):

* ``noise``        — `normal`, `philox_words`; jit helpers `philox_normal4`, `normal_quarters`,
  `quarter_offsets` (the noise contract of `fastddpm.rng`)
* ``reverse_step`` — `reverse_step` (DDPM / DDIM(η) step)
* ``q_sample``     — `q_sample`
* ``eps_loss``     — `eps_loss` (per-sample MSE + gradient), `eps_loss_grad`
* ``vlb_terms``    — `vlb_terms` (bits/dim per sample)
* ``ops``          — the same launchers with the `fastddpm::*` operator signatures (noise
  coordinates from a ``key`` tensor), for ``fastddpm.ops._register(ops, "cuda")``

Every launcher takes the noise coordinates either as Python ints (``seed``, ``sample_base``,
``step``: kernel parameters typed int64 and not specialized, so they never recompile) or as
``key=``, an int64 [seed, sample_base, step] tensor on the device that the kernel loads (also
safe to capture in a CUDA graph).

Import the launchers from their modules, e.g.
``from fastddpm.kernels.triton.reverse_step import reverse_step``: nothing is re-exported
here, so the module names are not shadowed by their functions.
"""

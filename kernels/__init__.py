"""Fused kernels for fastddpm (installed as ``fastddpm.kernels``).

``kernels.triton`` holds the Triton (CUDA) kernels; see ``kernels/README.md`` for the ABI
every backend follows. Nothing is imported here, so importing this package never needs
triton or a compiler.
"""

"""Build script. The package metadata lives in pyproject.toml; this file is where the
native (pybind11) kernels from kernels/ get compiled into the package."""

from setuptools import setup

setup()

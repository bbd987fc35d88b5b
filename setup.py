"""Build script. The package metadata lives in pyproject.toml; this file is where the
native (pybind11) kernels from kernels/native get compiled into the package, as
`fastddpm._native`.

The extension is optional: without pybind11 or a C++17 compiler the install still succeeds
(with a warning) and fastddpm runs on the reference ops. FASTDDPM_REQUIRE_NATIVE=1 turns
that warning into an error, for CI and wheel builds.
"""

import os
import sys
import tempfile
from pathlib import Path

from setuptools import setup
from setuptools.errors import CCompilerError, ExecError, PlatformError

NATIVE = Path("kernels/native")
REQUIRE_NATIVE = os.environ.get("FASTDDPM_REQUIRE_NATIVE") == "1"
BUILD_ERRORS = (CCompilerError, ExecError, PlatformError, OSError)

# Baseline ISA (no -march: wheels run on any x86-64); the hot loops carry their own AVX2 and
# AVX-512 versions, picked at load time (kernels/native/simd.h). No contraction into FMA, so
# results are the reference's operation by operation on every CPU and in every version. No
# errno and no FP traps (neither changes a value): without them GCC 12 keeps sqrt calls and the
# selects of float compares as branches, and the noise loop stays scalar.
UNIX_FLAGS = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off"]
MSVC_FLAGS = ["/O2", "/fp:precise"]
OPENMP_PROBE = "#include <omp.h>\nint probe() { return omp_get_max_threads(); }\n"


def _skip(reason):
    if REQUIRE_NATIVE:
        raise RuntimeError(f"FASTDDPM_REQUIRE_NATIVE=1 but the native kernels cannot be built: {reason}")
    print(f"WARNING: building fastddpm without its native kernels ({reason}); the reference ops will be used.",
          file=sys.stderr)


try:
    from pybind11.setup_helpers import ParallelCompile, Pybind11Extension, build_ext
except ImportError:
    _skip("pybind11 is not installed")
    ext_modules, cmdclass = [], {}
else:

    def _compiles(compiler, compile_flags, link_flags=None, source=OPENMP_PROBE):
        """Whether ``source`` compiles with ``compile_flags`` (and links as a shared object
        with ``link_flags``, unless None)."""
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp, "probe.cpp")
            path.write_text(source)
            try:
                objects = compiler.compile([str(path)], output_dir=tmp, extra_postargs=compile_flags)
                if link_flags is not None:
                    compiler.link_shared_object(objects, str(Path(tmp, "probe.so")), extra_postargs=link_flags)
            except BUILD_ERRORS:
                return False
        return True

    class OptionalBuildExt(build_ext):
        """build_ext that adds OpenMP where the compiler has it, and warns instead of failing."""

        def build_extensions(self):
            msvc = self.compiler.compiler_type == "msvc"
            compile_flags = list(MSVC_FLAGS if msvc else UNIX_FLAGS)
            openmp, openmp_link = (["/openmp"], []) if msvc else (["-fopenmp"], ["-fopenmp"])
            if _compiles(self.compiler, openmp, openmp_link):
                compile_flags += openmp
            else:
                print("WARNING: no OpenMP: the native kernels will run on one thread.", file=sys.stderr)
                openmp_link = []
                # `omp simd` loops still vectorize with -fopenmp-simd, which needs no runtime.
                if not msvc and _compiles(self.compiler, ["-fopenmp-simd"], source="int probe() { return 0; }\n"):
                    compile_flags.append("-fopenmp-simd")
            for ext in self.extensions:
                ext.extra_compile_args += compile_flags
                ext.extra_link_args += openmp_link
            super().build_extensions()

        def run(self):
            try:
                super().run()
            except BUILD_ERRORS as error:
                _skip(error)

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except BUILD_ERRORS as error:
                _skip(error)
                self.extensions.remove(ext)  # so no install step looks for its library

    ParallelCompile("FASTDDPM_BUILD_JOBS", default=0).install()  # one compiler per core
    ext_modules = [
        Pybind11Extension(
            "fastddpm._native",
            sorted(str(p) for p in NATIVE.glob("*.cpp")),
            depends=sorted(str(p) for p in [*NATIVE.glob("*.h"), *NATIVE.glob("*.inc")]),
            include_dirs=[str(NATIVE)],
            cxx_std=17,
        )
    ]
    cmdclass = {"build_ext": OptionalBuildExt}

setup(ext_modules=ext_modules, cmdclass=cmdclass)

"""Build script: compiles the engine's Cython core (``engine._core``).

The compile is not optional. If Cython or a C compiler is missing the build
stops with the error instead of silently installing only the pure-Python twin
(msgpack once did that, and users shipped the slow path without knowing).
``ENGINE_NO_EXTENSIONS=1`` at *run* time is the only way to use the twin.
"""

import os
import sys

from setuptools import Extension, setup

try:
    from Cython.Build import cythonize
except ImportError as exc:  # pragma: no cover - depends on the build environment
    sys.exit(f"engine: building requires Cython 3 (pip installs it from pyproject.toml): {exc}")

#: ENGINE_CYTHON_DEBUG=1 writes the annotated HTML (cython -a) and enables line tracing.
DEBUG = os.environ.get("ENGINE_CYTHON_DEBUG") == "1"

extensions = [
    Extension(
        "engine._core",
        ["engine/_core.pyx"],
        define_macros=[("CYTHON_TRACE", "1")] if DEBUG else [],
        # No fused multiply-adds: the moving averages must round as the pure twin's Python floats do.
        extra_compile_args=[] if sys.platform == "win32" else ["-ffp-contract=off"],
    )
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        annotate=DEBUG,
        compiler_directives={"linetrace": DEBUG, "embedsignature": True},
    )
)

"""Builds the one compiled unit, mqfast._core.

MQFAST_DEBUG=1 keeps asserts, line tracing and an annotated HTML next to the source;
MQFAST_SANITIZE=1 builds with AddressSanitizer (run with LD_PRELOAD of libasan).
"""

import os

from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("MQFAST_DEBUG") == "1"
SANITIZE = os.environ.get("MQFAST_SANITIZE") == "1"

cflags = ["-O2"]
ldflags: list[str] = []
macros: list[tuple[str, str | None]] = []
directives = {
    "language_level": "3",
    "boundscheck": False,
    "wraparound": False,
    "cdivision": True,
    "embedsignature": True,
    "auto_pickle": False,
}
if DEBUG:
    cflags = ["-O0", "-g"]
    macros.append(("CYTHON_TRACE_NOGIL", "1"))
    directives.update({"linetrace": True, "boundscheck": True, "wraparound": True})
else:
    macros.append(("CYTHON_WITHOUT_ASSERTIONS", None))
if SANITIZE:
    cflags += ["-fsanitize=address", "-fno-omit-frame-pointer", "-g"]
    ldflags += ["-fsanitize=address"]

ext = Extension(
    "mqfast._core",
    ["src/mqfast/_core.pyx"],
    extra_compile_args=cflags,
    extra_link_args=ldflags,
    define_macros=macros,
)

setup(
    ext_modules=cythonize(
        [ext],
        compiler_directives=directives,
        annotate=DEBUG,
        include_path=["src/mqfast"],
    ),
)

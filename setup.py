"""Build step for the one compiled part: the per-row top-k (gin_adapter/native/row_topk.c).

Optional: where no C compiler is found, or the build fails (MSVC, say: the kernel uses GCC vector extensions),
the package installs without it and ``gin_adapter.top_k`` uses ATen's top-k instead. Everything else is in
pyproject.toml.
"""

import sys

from setuptools import Extension, setup

# -fopenmp: the library then takes the libgomp.so.1 PyTorch has loaded and runs on PyTorch's OpenMP threads (row_topk.c);
# Apple's clang has no -fopenmp (single-threaded there), MSVC takes none of these flags (the build is skipped).
compile_flags = {"win32": [], "darwin": ["-O3"]}.get(sys.platform, ["-O3", "-fopenmp"])
link_flags = ["-fopenmp"] if "-fopenmp" in compile_flags else []
setup(ext_modules=[Extension("gin_adapter._row_topk", sources=["gin_adapter/native/row_topk.c"], define_macros=[("GIN_PYTHON_MODULE", "1")],
                             extra_compile_args=compile_flags, extra_link_args=link_flags, optional=True)])

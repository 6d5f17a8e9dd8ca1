"""Build step for the one compiled part: the per-row top-k (gin_adapter/native/row_topk.c).

Optional: where no C compiler is found, or the build fails (MSVC, say: the kernel uses POSIX threads and GCC
vector extensions), the package installs without it and ``gin_adapter.native_top_k`` falls back to
``torch.topk``. Everything else is in pyproject.toml.
"""

import sys

from setuptools import Extension, setup

flags = [] if sys.platform == "win32" else ["-O3", "-pthread"]
setup(ext_modules=[Extension("gin_adapter._row_topk", sources=["gin_adapter/native/row_topk.c"], define_macros=[("GIN_PYTHON_MODULE", "1")],
                             extra_compile_args=flags, extra_link_args=flags[1:], optional=True)])

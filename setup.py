"""Build step for the compiled CPU kernels in gin_adapter/native/: the per-row top-k (row_topk.c), the top-k
graph's neighbour sum with its backward (graph_sum.c), the causal mask and softmax backward of a query chunk's
scores (score_rows.c) and the attention with either graph, forward and backward (tiles.c, attention_graph.c,
threshold_graph.c), one library ``gin_adapter._native`` called through ctypes.

Optional: where no C compiler is found, or the build fails (MSVC, say: the kernels use GCC vector extensions),
the package installs without it and the kernels use ATen's operators instead (``gin_adapter.native_library``).
Everything else is in pyproject.toml.
"""

import sys

from setuptools import Extension, setup

# -fopenmp: the library then takes the libgomp.so.1 PyTorch has loaded and runs on PyTorch's OpenMP threads (row_topk.c);
# Apple's clang has no -fopenmp (single-threaded there), MSVC takes none of these flags (the build is skipped).
compile_flags = {"win32": [], "darwin": ["-O3"]}.get(sys.platform, ["-O3", "-fopenmp"])
link_flags = ["-fopenmp"] if "-fopenmp" in compile_flags else []
sources = [f"gin_adapter/native/{name}.c" for name in ("module", "row_topk", "graph_sum", "score_rows", "tiles", "attention_graph", "threshold_graph", "block_forward", "decode_graph")]
setup(ext_modules=[Extension("gin_adapter._native", sources=sources, depends=[f"gin_adapter/native/{name}.h" for name in ("parallel", "row_topk", "softmax_grad", "tiles", "vectors", "weighted_rows")], libraries=[] if sys.platform == "win32" else ["m"],
                             extra_compile_args=compile_flags, extra_link_args=link_flags, optional=True)])

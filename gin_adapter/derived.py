"""Products of parameters computed once and reused while no gradient is recorded (decoding, evaluation).

A decoded token runs each wrapped layer's block once, and there every operator call costs several microseconds
whatever its size (docs/benchmarks.md). Two of the block's operands depend on parameters only: the self weight
``c = offset + eps`` and the norm's gain ``g = weight * scale``. :class:`Derived` computes such a value when a
gradient is recorded or ``torch.compile`` traces (autograd and the compiler need the operation) and otherwise
returns the value it computed last, until one of its source tensors changed: another storage (``.to()``,
``param.data = ...``), another dtype, or an in-place write (an optimiser step, ``load_state_dict``, ``fill_``:
each bumps the tensor's version counter). A detached alias of each source is kept with the value, so a freed
storage's address cannot be reused by a new one that would look unchanged.
"""

from __future__ import annotations

from typing import Callable

import torch


class Derived:
    """``fn(*sources)``, cached across calls without gradient recording (see the module docstring)."""

    def __init__(self, fn: Callable[..., torch.Tensor]) -> None:
        self.fn = fn
        self._sources: tuple[tuple[torch.Tensor, int], ...] = ()
        self._value: torch.Tensor | None = None

    def __call__(self, *sources: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return self.fn(*sources)
        if not self._unchanged(sources):
            self._value = self.fn(*sources)
            self._sources = tuple((t.detach(), t._version) for t in sources)
        return self._value

    def _unchanged(self, sources: tuple[torch.Tensor, ...]) -> bool:
        return self._value is not None and len(sources) == len(self._sources) and all(
            t._version == version and t.data_ptr() == alias.data_ptr() and t.dtype == alias.dtype and t.device == alias.device
            for t, (alias, version) in zip(sources, self._sources)
        )

    def __deepcopy__(self, memo: dict) -> Derived:
        return Derived(self.fn)  # a copy's parameters are other tensors: nothing cached carries over

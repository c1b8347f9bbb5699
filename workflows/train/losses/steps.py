"""Tell step-dependent losses which step they are on, before each forward pass.

Some objectives depend on where training is, not only on the batch: 2DMSE samples its depths and
dims from a generator seeded by ``(seed, step)`` (identical on every rank, reproducible from the
run's seed), and PEG's progressive weighting moves from easy to hard samples as ``step /
total_steps`` grows. Such a loss (or any module nested inside it) defines::

    def begin_step(self, step: int, total_steps: int, seed: int) -> None: ...

and the training loop calls :func:`begin_step` on the step's loss before its forward pass. The
step is the global optimizer step (0-based), so a run resumed from a checkpoint samples exactly
what an uninterrupted run would have.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class StepAware(Protocol):
    def begin_step(self, step: int, total_steps: int, seed: int) -> None: ...


def step_aware_modules(loss: Any) -> list[Any]:
    """Every module in ``loss`` (itself included) that takes :meth:`StepAware.begin_step`."""
    modules = loss.modules() if hasattr(loss, "modules") else [loss]
    return [m for m in modules if isinstance(m, StepAware)]


def begin_step(loss: Any, *, step: int, total_steps: int, seed: int) -> int:
    """Call ``begin_step`` on every step-aware module of ``loss``; returns how many there were."""
    if step < 0 or total_steps < 1:
        raise ValueError(f"begin_step: step must be >= 0 and total_steps >= 1, got {step} and {total_steps}")
    modules = step_aware_modules(loss)
    for module in modules:
        module.begin_step(step, total_steps, seed)
    return len(modules)

"""What the machine computes fast: the ``dtype: auto`` rule every engine and encoder uses.

``auto`` resolves, on the process that runs the model, to

* ``bfloat16`` on a CUDA GPU that supports it (Ampere and newer), ``float16`` on older GPUs;
* ``bfloat16`` on a CPU with native bf16 arithmetic: x86 ``avx512_bf16`` or ``amx_bf16``,
  Arm ``bf16`` (e.g. Graviton 3, Neoverse V1);
* ``float32`` on every other CPU. On an AVX2-only CPU a bf16 matmul emulated in software was
  measured 79x slower than fp32 and vLLM translated 6x slower in bf16 (``benchmarks/synthesize.py``
  prints the ratio on the machine it runs on).

Weights stored in bf16 (the GGUF imports) are upcast when loaded in fp32: the cost is memory
(2x), not accuracy. The rule reads ``/proc/cpuinfo`` (Linux) and falls back to torch's own
probes elsewhere; ``EMBEDFORGE_CPU_BF16=0|1`` overrides the CPU answer for machines whose flags
lie (some hypervisors hide them).
"""

from __future__ import annotations

import functools
import logging
import os
import platform
from typing import Literal

log = logging.getLogger(__name__)

Dtype = Literal["auto", "bfloat16", "float16", "float32"]
ConcreteDtype = Literal["bfloat16", "float16", "float32"]

_X86_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
_ARM_BF16_FLAGS = ("bf16",)


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        pass
    return set()


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when this CPU does bf16 matrix arithmetic in hardware."""
    forced = os.environ.get("EMBEDFORGE_CPU_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    flags = _cpu_flags()
    if flags:
        arm = platform.machine().lower() in ("aarch64", "arm64")
        return any(f in flags for f in (_ARM_BF16_FLAGS if arm else _X86_BF16_FLAGS))
    try:  # no /proc/cpuinfo (macOS, containers without it): ask torch
        import torch

        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (ImportError, AttributeError):
        return False


def cpu_capability() -> str:
    """torch's name for the vector ISA it dispatches to (``AVX2``, ``AVX512``, ...), for logs and reports."""
    try:
        import torch

        return str(torch.backends.cpu.get_cpu_capability())
    except (ImportError, AttributeError):
        return "unknown"


def resolve_dtype(requested: Dtype | str, device: str = "cpu") -> ConcreteDtype:
    """The concrete dtype for ``requested`` on ``device`` (``cpu``, ``cuda``, ``cuda:1``)."""
    if requested not in ("auto", "bfloat16", "float16", "float32"):
        raise ValueError(f"dtype {requested!r}: use one of auto, bfloat16, float16, float32")
    if requested != "auto":
        return requested  # type: ignore[return-value]
    if device.startswith("cuda"):
        try:
            import torch

            if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
                return "float16"
        except ImportError:
            pass
        return "bfloat16"
    return "bfloat16" if cpu_has_native_bf16() else "float32"


def describe() -> dict[str, object]:
    """Machine facts recorded beside results: CPU model, ISA, native bf16, what ``auto`` picks."""
    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    return {"cpu": model or platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "cpu_capability": cpu_capability(), "cpu_native_bf16": cpu_has_native_bf16(),
            "auto_dtype_cpu": resolve_dtype("auto", "cpu")}

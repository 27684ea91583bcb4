"""What this CPU has that decides onnxruntime's integer arithmetic (its kernels are chosen by the
feature flags): read by the integer reference (`qexport.ops.integer`) and by `qexport run`/`verify`."""
from __future__ import annotations


def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags as Linux lists them (empty when they cannot be read): onnxruntime
    picks its integer kernels by them, so the integer reference must too."""
    try:
        with open("/proc/cpuinfo") as f:
            return frozenset(w for line in f if line.startswith("flags") for w in line.split(":", 1)[1].split())
    except OSError:
        return frozenset()


def cpu_has_vnni() -> bool | None:
    """Whether this x86 CPU has VNNI (no int16 saturation); None when it cannot be told."""
    flags = cpu_flags()
    if "avx2" not in flags:
        return None  # not x86 (ARM dot-product kernels do not saturate)
    return "avx512_vnni" in flags or "avx_vnni" in flags or "amx_int8" in flags

"""What a CPU offers low-precision kernels: its model name and ISA flags (/proc/cpuinfo)."""
import platform
from typing import Set, Tuple

import torch

__all__ = ["BF16_FLAGS", "CPU_FLAGS", "INT8_FLAGS", "cpu_description", "cpu_flags", "cpu_has_bf16_kernels", "cpu_has_int8_kernels", "int8_needs_reduced_range"]


# /proc/cpuinfo flags that decide how fast low-precision convolutions run on a CPU: without
# avx512_bf16 or amx_bf16, oneDNN emulates bfloat16 (seen here on an AVX2-only EPYC: a 3x3
# conv 50x slower than float32); with AMX a bf16 R-50 training step is 3-4x faster. int8
# convolutions need VNNI (avx_vnni, avx512_vnni) or AMX-INT8 to run much faster than float32.
CPU_FLAGS = ("avx2", "avx_vnni", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_bf16", "amx_fp16", "amx_int8")


BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # bfloat16 arithmetic for oneDNN
INT8_FLAGS = ("avx_vnni", "avx512_vnni", "amx_int8")  # int8 dot products


def _cpuinfo() -> Tuple[str, str]:
    """(model name, flags) of the first CPU in /proc/cpuinfo; empty strings where unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return "", ""
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    return fields.get("model name", ""), fields.get("flags", "")


def cpu_flags() -> Set[str]:
    """The ISA flags of this CPU (/proc/cpuinfo; empty where unknown)."""
    return set(_cpuinfo()[1].split())


def cpu_has_bf16_kernels() -> bool:
    """Whether this CPU has bfloat16 arithmetic (AVX512-BF16 or AMX-BF16) for oneDNN."""
    return any(f in cpu_flags() for f in BF16_FLAGS)


def cpu_has_int8_kernels() -> bool:
    """Whether this CPU has int8 dot products (AVX-VNNI, AVX512-VNNI or AMX-INT8)."""
    return any(f in cpu_flags() for f in INT8_FLAGS)


def int8_needs_reduced_range() -> bool:
    """Whether int8 weights must keep 7 bits: without VNNI, the u8 x s8 multiply-add of AVX2 and
    AVX-512 (``vpmaddubsw``) adds pairs of products into int16, which 8-bit weights can saturate."""
    return not cpu_has_int8_kernels()


def cpu_description() -> str:
    """E.g. "AMD EPYC; avx2 yes, avx512f no, ...; torch CPU capability AVX2": what a benchmark
    must print, since low-precision speed depends on these flags."""
    model, flags = _cpuinfo()
    present = flags.split()
    isa = ", ".join(f"{f} {'yes' if f in present else 'no'}" for f in CPU_FLAGS)
    return f"{model or platform.processor() or platform.machine()}; {isa}; torch CPU capability {torch.backends.cpu.get_cpu_capability()}"

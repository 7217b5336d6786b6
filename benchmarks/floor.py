"""The floor: how fast a shape could possibly run, to say how far each contender is from it.

FLOPs count the matrix multiplications of a BERT-style encoder (projections, attention scores
and values, feed-forward); everything else is small next to them. Peak rates are cores x
measured clock x operations per cycle of the detected microarchitecture's vector units. The
clock is measured with a chain of dependent 64-bit integer multiplies (3 cycles each on every
x86 core of the last decade; a chain of adds no longer works: Intel's Golden Cove and later
resolve adds of an immediate at rename, and read 18 GHz), compiled with the system C compiler;
where that is impossible the kernel's reported frequency is used, and the result says which.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

_CLOCK_C = r"""
#include <stdio.h>
#include <time.h>
int main(void) {
    const long iterations = 100000000L;  /* x 8 dependent multiplies, 3 cycles each */
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    __asm__ volatile(
        "mov $3, %%rax\n"
        "mov %0, %%rcx\n"
        "1:\n"
        "imul %%rax, %%rax\n imul %%rax, %%rax\n imul %%rax, %%rax\n imul %%rax, %%rax\n"
        "imul %%rax, %%rax\n imul %%rax, %%rax\n imul %%rax, %%rax\n imul %%rax, %%rax\n"
        "sub $1, %%rcx\n jnz 1b\n" : : "r"(iterations) : "rax", "rcx", "cc");
    clock_gettime(CLOCK_MONOTONIC, &b);
    double seconds = (b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) / 1e9;
    printf("%.4f\n", iterations * 8 * 3 / seconds / 1e9);
    return 0;
}
"""


def measured_clock_ghz() -> tuple[float | None, str]:
    """(GHz, how it was obtained): the best of three runs of a dependent-add chain."""
    if os.uname().machine == "x86_64":
        with tempfile.TemporaryDirectory() as tmp:
            source, binary = Path(tmp) / "clock.c", Path(tmp) / "clock"
            source.write_text(_CLOCK_C)
            try:
                subprocess.run(
                    ["cc", "-O1", "-o", str(binary), str(source)],
                    check=True,
                    capture_output=True,
                    timeout=60,
                )
                runs = [
                    float(
                        subprocess.run(
                            [str(binary)], check=True, capture_output=True, text=True, timeout=60
                        ).stdout
                    )
                    for _ in range(3)
                ]
                return round(max(runs), 3), "measured: dependent integer multiplies, best of 3"
            except (OSError, subprocess.SubprocessError, ValueError):
                pass
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    match = re.search(r"cpu MHz\s*:\s*([\d.]+)", text)
    return (
        (round(float(match.group(1)) / 1000, 3), "reported by /proc/cpuinfo")
        if match
        else (None, "unknown")
    )


def _cpuid() -> dict[str, str]:
    info: dict[str, str] = {}
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    return info


def per_cycle_rates() -> dict[str, Any]:
    """FP32 FLOP and INT8 op throughput per cycle per core, by microarchitecture (documented guesses)."""
    info = _cpuid()
    vendor, family, model = (
        info.get("vendor_id", ""),
        int(info.get("cpu family", "0") or 0),
        int(info.get("model", "0") or 0),
    )
    flags = set(info.get("flags", "").split())
    if vendor == "AuthenticAMD" and family == 25:
        # Zen 4: AVX-512 on two 256-bit FMA pipes; VNNI on the same two pipes.
        return {
            "uarch": "AMD Zen 4",
            "fp32": 32,
            "int8": 128,
            "note": "2 x 256-bit FMA; VNNI 2 x 32 MAC",
        }
    if vendor == "AuthenticAMD" and family == 26:
        return {
            "uarch": "AMD Zen 5",
            "fp32": 64,
            "int8": 256,
            "note": "2 x 512-bit FMA; VNNI 2 x 64 MAC",
        }
    if vendor == "GenuineIntel" and "avx512f" in flags:
        name = {
            85: "Skylake-SP / Cascade Lake",
            106: "Ice Lake-SP",
            143: "Sapphire Rapids",
            207: "Emerald Rapids",
        }.get(model, f"Intel model {model}")
        if "amx_int8" in flags:
            # AMX: one TMUL per core, 16x64 INT8 by 64x16 per tile multiply (16 cycles).
            return {
                "uarch": f"{name} (AMX)"
                if model in (143, 207)
                else f"Intel with AMX (model {model})",
                "fp32": 64,
                "int8": 2048,
                "note": "FP32: 2 x 512-bit FMA ports; INT8: AMX, 1024 MAC per cycle (bf16: 512 MAC)",
            }
        int8 = 256 if "avx512_vnni" in flags else 128
        return {
            "uarch": name,
            "fp32": 64,
            "int8": int8,
            "note": "assumes 2 x 512-bit FMA ports (Gold 6xxx/Platinum); 1-port parts have half",
        }
    if "fma" in flags and "avx2" in flags:
        return {
            "uarch": "AVX2 + FMA",
            "fp32": 32,
            "int8": 64,
            "note": "2 x 256-bit FMA; INT8 through vpmaddubsw",
        }
    return {"uarch": "unknown", "fp32": None, "int8": None, "note": "no table entry"}


def peaks(cores: int) -> dict[str, Any]:
    ghz, how = measured_clock_ghz()
    rates = per_cycle_rates()
    out: dict[str, Any] = {"clock_ghz": ghz, "clock_source": how, "cores": cores, **rates}
    for kind in ("fp32", "int8"):
        per_cycle = rates[kind]
        out[f"{kind}_gops_per_core"] = round(ghz * per_cycle, 1) if ghz and per_cycle else None
    return out


def encoder_flops(batch: int, sequence: int, layers: int, hidden: int, intermediate: int) -> int:
    """Matmul FLOPs of one forward pass: per layer 8bsh^2 (QKV + output) + 4bs^2h (scores, values) + 4bshi (FFN)."""
    b, s, h, i = batch, sequence, hidden, intermediate
    return layers * (8 * b * s * h * h + 4 * b * s * s * h + 4 * b * s * h * i)


def fraction_of_peak(
    flops: int, seconds: float, gops_per_core: float | None, threads: int
) -> float | None:
    if not gops_per_core or seconds <= 0:
        return None
    return round(flops / seconds / (gops_per_core * 1e9 * threads), 4)

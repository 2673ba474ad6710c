"""The engine's compiled CPU kernels (csrc/*.cpp), built once per machine on first use.

torch.utils.cpp_extension compiles them with the machine's g++, ninja and Python headers
(installed by scripts/install-system-deps.sh) into <cache>/torch_extensions/ (~80 s on 2 cores, once; later
processes load the built library in milliseconds, and an edited source is rebuilt). They
form one Python module of plain functions (csrc/bindings.cpp says why pybind11 and not
torch.ops) and split work on torch's own OpenMP pool.
Each kernel has a plain-torch reference that the tests hold it to (named at the top of its
source file; docs/engine.md has the table).
"""

from __future__ import annotations

import functools
from pathlib import Path
from types import ModuleType

import torch

from services.env import cache_root

_CSRC = Path(__file__).parent / "csrc"
# -march=native: the library is built on, and cached for, the machine that runs it.
# -ffp-contract=off: no implicit fused multiply-adds, so the int8 glue is bitwise torch's (the oracles').
# -mprefer-vector-width=512: let the auto-vectorized loops use the full AVX512 width where there is one.
# -fopenmp: at::parallel_for is a header template that only splits work when compiled with OpenMP;
#   the library then binds to the libgomp.so.1 that torch has already loaded (same soname): one pool.
_CFLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-ffp-contract=off", "-fopenmp"]


def _vector_flags() -> list[str]:
    """at::vec (used for exp) at the width torch itself picked on this CPU: AVX512, AVX2 or scalar."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability in ("AVX512", "AVX2"):
        return [f"-DCPU_CAPABILITY={capability}", f"-DCPU_CAPABILITY_{capability}"]
    return ["-DCPU_CAPABILITY=DEFAULT"]


class NativeBuildError(RuntimeError):
    """The kernels could not be compiled (no compiler or ninja, or a build error)."""


@functools.cache
def ops() -> ModuleType:
    """Every kernel of csrc/ (declared in csrc/ops.h), built into one module on first use.

    int8_linear_into                 int8_ops.cpp        the whole int8 linear, GEMM split by columns across threads
    int8_parts_into                  int8_ops.cpp        a fused projection's parts with different inputs (rank-1 FLoRA), one call
    quantize_rows, dequantize_into   int8_ops.cpp        its input quantization and epilogue (+ FLoRA's scales)
    lora_bgmv_                       lora_ops.cpp        LoRA rows, each reading its own adapter
    write_kv_, paged_decode_attention_  attention_ops.cpp   the paged KV cache: this step's K/V in, decode rows
    rms_norm, rope, silu_mul         norm_ops.cpp, rope_ops.cpp, activation_ops.cpp
    argmax_rows                      argmax_ops.cpp      greedy sampling
    """
    from torch.utils.cpp_extension import load

    build_dir = cache_root() / "torch_extensions" / "flora_native"
    build_dir.mkdir(parents=True, exist_ok=True)
    sources = sorted(str(p) for p in _CSRC.glob("*.cpp"))
    try:
        return load(
            name="flora_native",
            sources=sources,
            extra_cflags=_CFLAGS + _vector_flags(),
            extra_ldflags=["-fopenmp"],
            build_directory=str(build_dir),
        )
    except (RuntimeError, OSError) as e:
        raise NativeBuildError(
            f"could not build the engine's C++ kernels ({', '.join(Path(s).name for s in sources)}): {e}. "
            "They need g++, ninja and the Python headers: run scripts/install-system-deps.sh as root (or apt-get install g++ ninja-build python3-dev)."
        ) from e

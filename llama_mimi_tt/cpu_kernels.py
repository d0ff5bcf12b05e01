"""Our int4 matmul for CPUs with AVX-512 VNNI (``kernels/int4_matmul.c``), built once with gcc.

PyTorch's int4 CPU kernel reads its weights at 10-16 GB/s on a 2-core AVX-512 machine, about a
third of the memory bandwidth (bench/RESULTS.md). Batch-1 decoding is a matrix-vector product
per layer, so a kernel that streams the packed weights through ``vpdpbusd`` decodes faster. The
C file is compiled on first use into ``$XDG_CACHE_HOME/llama_mimi_tt`` (keyed by its hash) and
called through ctypes; where the CPU lacks VNNI or gcc is missing, ``available()`` is False and
quantize falls back to torchao.
"""

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

import torch
from torchtune.utils import get_logger

GROUP_SIZE = 128  # columns per weight scale and zero (the kernel's fixed group)
SOURCE = Path(__file__).with_name("kernels") / "int4_matmul.c"
log = get_logger("INFO")

CPU_FLAGS = ("avx512f", "avx512bw", "avx512_vnni")
GCC_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vnni", "-fopenmp", "-shared", "-fPIC"]


def _cpu_has_vnni() -> bool:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next(
        (line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")),
        [],
    )
    return all(f in flags for f in CPU_FLAGS)


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "llama_mimi_tt"


@functools.lru_cache(maxsize=1)
def _library() -> Optional[ctypes.CDLL]:
    """The built kernel, or None where it cannot run here (no VNNI, no gcc, build failed)."""
    if (
        os.environ.get("LLAMA_MIMI_NO_CPU_KERNELS")
        or not _cpu_has_vnni()
        or not shutil.which("gcc")
    ):
        return None
    source = SOURCE.read_bytes()
    lib = _cache_dir() / f"int4_matmul-{hashlib.sha1(source).hexdigest()[:12]}.so"
    try:
        if not lib.is_file():
            _build(lib)
        so = ctypes.CDLL(str(lib))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", None) or str(e)
        log.warning(
            f"the int4 CPU kernel could not be built ({detail.strip()[:300]}); int4 uses torchao"
        )
        return None
    so.int4_matmul.restype = ctypes.c_int
    so.int4_matmul.argtypes = [
        ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
    ]  # fmt: skip
    return so


def _build(lib: Path) -> None:
    lib.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
        built = Path(tmp) / lib.name
        cmd = ["gcc", *GCC_FLAGS, "-o", str(built), str(SOURCE)]
        subprocess.run(cmd, capture_output=True, text=True, check=True)
        os.replace(built, lib)  # atomic: a second process never loads a half-written file


def available() -> bool:
    """Whether the int4 kernel runs on this machine."""
    return _library() is not None


def pack_int4(weight: torch.Tensor):
    """``(packed uint8 [N, K / 2], scales fp32 [N, K / 128], zeros fp32 [N, K / 128])`` of a
    ``[N, K]`` weight: asymmetric round-to-nearest per group, ``w ~ (q - zero) * scale``."""
    w = weight.detach().float()
    n, k = w.shape
    g = w.view(n, k // GROUP_SIZE, GROUP_SIZE)
    lo, hi = g.amin(-1), g.amax(-1)
    scales = ((hi - lo) / 15).clamp(min=1e-12)
    zeros = -lo / scales
    q = torch.round(g / scales[..., None] + zeros[..., None]).clamp(0, 15).to(torch.uint8)
    halves = q.view(n, k // GROUP_SIZE, 2, GROUP_SIZE // 2)
    packed = halves[:, :, 0] | (halves[:, :, 1] << 4)
    return packed.reshape(n, k // 2).contiguous(), scales.contiguous(), zeros.contiguous()


def unpack_int4(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """The ``[N, K]`` float32 weight that ``pack_int4``'s output stands for."""
    n = packed.shape[0]
    g = packed.view(n, -1, GROUP_SIZE // 2)
    q = torch.stack([g & 15, g >> 4], dim=2).view(n, -1, GROUP_SIZE).float()
    return ((q - zeros[..., None]) * scales[..., None]).view(n, -1)


def int4_matmul(x: torch.Tensor, packed, scales, zeros) -> torch.Tensor:
    """``x [M, K] @ w.T`` in float32 for ``pack_int4``'s weight (x quantized to int8 per group)."""
    so = _library()
    if so is None:
        raise RuntimeError("the int4 CPU kernel is not available on this machine")
    x = x.float().contiguous()
    m, k = x.shape
    n = packed.shape[0]
    if k != 2 * packed.shape[1] or k % GROUP_SIZE:
        raise ValueError(f"x has {k} columns; the int4 weight has {2 * packed.shape[1]}")
    y = torch.empty(m, n, dtype=torch.float32)
    status = so.int4_matmul(
        x.data_ptr(), m, k, packed.data_ptr(), scales.data_ptr(), zeros.data_ptr(), n,
        y.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    if status:
        raise RuntimeError(f"int4_matmul failed (status {status}) for x {tuple(x.shape)}")
    return y

"""Our kernels for decoding on AVX-512 CPUs (``kernels/cpu_matmul.c``), built once with gcc.

Batch-1 decoding is one matrix-vector product per linear layer, so its speed is the rate at
which the weights stream from memory. PyTorch's CPU kernels read them at 10-20 GB/s on a
2-core AVX-512 machine where a plain read reaches 25-30 GB/s; ours stream int8 weights with
fp32 activations (AVX-512F; ``int8``), int4 and int8 weights with int8 activations (VNNI's
``vpdpbusd``; ``w4a8``, ``w8a8``) and bf16 weights through ``vdpbf16ps`` (bench/RESULTS.md;
``int4`` is torchao's, which ran faster than a weight-only int4 kernel of ours).
``decode_attention`` attends one query per sequence over a grouped-query KV cache without
expanding its heads (fused_layers.py uses it).

The C file is compiled on first use, once per instruction set (``LIBRARIES``: each function
carries its own target attribute, no global ``-mavx512*`` flag), into
``$XDG_CACHE_HOME/llama_mimi_tt`` (``~/.cache/llama_mimi_tt``; keyed by the source's hash),
and called through ctypes, wrapped as torch custom ops so that ``torch.compile`` keeps them in
its graph. ``available(kernel)`` is False where the CPU lacks that kernel's instructions, gcc
is missing or its library fails to build (each said once per process, in one logged line);
quantize then uses PyTorch's or torchao's code. ``LLAMA_MIMI_CPU_KERNELS=0`` turns them all off
(read at each call).
"""

import ctypes
import functools
import hashlib
import mmap
import os
import shutil
import subprocess
from pathlib import Path
from typing import Optional

import torch
from torchtune.utils import get_logger

from llama_mimi_tt.atomic_files import replacing
from llama_mimi_tt.errors import UserError

GROUP_SIZE = 128  # columns per int4 scale and zero, and per int8 activation scale
SOURCE = Path(__file__).with_name("kernels") / "cpu_matmul.c"
SWITCH = "LLAMA_MIMI_CPU_KERNELS"  # 0: our kernels off, PyTorch's and torchao's code instead
log = get_logger("INFO")

LIBRARIES = {  # one library per instruction set: (-D of its section, /proc/cpuinfo flags)
    "avx512f": ("KERNELS_F", ("avx512f",)),
    "vnni": ("KERNELS_VNNI", ("avx512f", "avx512bw", "avx512_vnni")),
    "bf16": ("KERNELS_BF16", ("avx512f", "avx512bw", "avx512_bf16")),
}
KERNELS = {  # kernel: (its library, its C functions)
    "int8": ("avx512f", ("int8_matmul",)),
    "attention": ("avx512f", ("decode_attention", "rms_norm", "rope")),  # fused_layers.py
    "w4a8": ("vnni", ("w4a8_matmul",)),
    "w8a8": ("vnni", ("w8a8_matmul",)),
    "bf16": ("bf16", ("bf16_matmul",)),
}
CPU_FLAGS = {kernel: LIBRARIES[library][1] for kernel, (library, _) in KERNELS.items()}
GCC_FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC"]  # the instruction sets: target attributes
_P, _I = ctypes.c_void_p, ctypes.c_int
_SIGNATURES = {  # (pointers and ints of each C function, in order)
    "int8_matmul": [_P, _I, _I, _P, _I, _P, _I],
    "w4a8_matmul": [_P, _I, _I, _P, _P, _P, _I, _P, _I],
    "w8a8_matmul": [_P, _I, _I, _P, _P, _I, _P, _I],
    "bf16_matmul": [_P, _I, _I, _P, _I, _P, _I],
    "rms_norm": [_P, _I, _I, _P, ctypes.c_float, _P],
    "rope": [_P, _I, _I, _I, _I, ctypes.c_long, ctypes.c_long, _P, _I, _P, _P],
    "decode_attention": [_P, _I, _I, _I, _I, _P, _P, _I, _P, ctypes.c_float, _P, _I],
}


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> frozenset:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "flags:")
    return frozenset(line.split(":", 1)[1].split())


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "llama_mimi_tt"


def enabled() -> bool:
    """Whether our kernels may run: not when ``LLAMA_MIMI_CPU_KERNELS=0``. Read at each call,
    so that the switch takes effect for the next model quantized."""
    if os.environ.get("LLAMA_MIMI_NO_CPU_KERNELS"):  # the old name of the switch
        _say_once("LLAMA_MIMI_NO_CPU_KERNELS is no longer read: set LLAMA_MIMI_CPU_KERNELS=0")
    return os.environ.get(SWITCH, "1").strip() != "0"


_SAID: set = set()


def _say_once(message: str) -> None:
    """Logs ``message`` the first time only (a fallback is said once per process)."""
    if message not in _SAID:
        _SAID.add(message)
        log.warning(message)


@functools.cache
def _library(library: str) -> Optional[ctypes.CDLL]:
    """The built ``library`` (a key of LIBRARIES), or None (said once) where it cannot be built
    or loaded."""
    source = SOURCE.read_bytes()
    lib = _cache_dir() / f"cpu_kernels-{library}-{hashlib.sha1(source).hexdigest()[:12]}.so"
    if not lib.is_file() and not shutil.which("gcc"):
        _say_once(
            f"our CPU kernels are off: gcc is not installed (they are compiled on first use, "
            f"into {lib.parent}); PyTorch's and torchao's code runs instead"
        )
        return None
    try:
        if not lib.is_file():
            _build(lib, LIBRARIES[library][0])
        so = ctypes.CDLL(str(lib))
    except (OSError, UserError, subprocess.CalledProcessError) as e:
        detail = " ".join((getattr(e, "stderr", None) or str(e)).split())
        kernels = ", ".join(k for k, (name, _) in KERNELS.items() if name == library)
        _say_once(
            f"our {library} CPU kernels ({kernels}) are off: building {lib} failed "
            f"({detail[:300]}); PyTorch's and torchao's code runs instead"
        )
        return None
    for _, functions in (v for v in KERNELS.values() if v[0] == library):
        for name in functions:
            fn = getattr(so, name)
            fn.restype, fn.argtypes = ctypes.c_int, _SIGNATURES[name]
    return so


def _build(lib: Path, section: str) -> None:
    lib.parent.mkdir(parents=True, exist_ok=True)
    with replacing(lib) as built:  # a second process never loads a half-written file
        cmd = ["gcc", *GCC_FLAGS, f"-D{section}", "-o", str(built), str(SOURCE)]
        subprocess.run(cmd, capture_output=True, text=True, check=True)


def available_on_cpu(kernel: str) -> bool:
    """Whether this CPU has the instructions that ``kernel`` needs (a key of CPU_FLAGS)."""
    return all(flag in _cpu_flags() for flag in CPU_FLAGS[kernel])


def available(kernel: str) -> bool:
    """Whether ``kernel`` (a key of KERNELS) runs here: the switch is on, the CPU has its
    instructions and its library is built. Why not is logged once."""
    if not enabled():
        return False
    missing = [flag for flag in CPU_FLAGS[kernel] if flag not in _cpu_flags()]
    if missing:
        _say_once(
            f"our {kernel} CPU kernel is off: this CPU lacks {', '.join(missing)}; PyTorch's "
            "or torchao's code runs instead"
        )
        return False
    return _library(KERNELS[kernel][0]) is not None


def _functions(kernel: str) -> ctypes.CDLL:
    """The library holding ``kernel``'s C functions (an error where it cannot run here)."""
    so = _library(KERNELS[kernel][0]) if available_on_cpu(kernel) else None
    if so is None:
        raise RuntimeError(f"our {kernel} CPU kernel is not available on this machine")
    return so


def in_huge_pages(t: torch.Tensor) -> torch.Tensor:
    """A copy of CPU tensor ``t`` (2 MB or more) in memory that Linux backs with 2 MB pages
    (transparent huge pages, ``madvise`` mode included), else ``t`` itself. Streaming a weight
    through 4 KB pages costs a page walk every 4 KB: one thread read 19 GB/s here, against
    29 GB/s from 2 MB pages (bench/RESULTS.md)."""
    nbytes = t.numel() * t.element_size()
    if nbytes < 2**21 or not t.is_cpu or not hasattr(mmap, "MADV_HUGEPAGE"):
        return t
    memory = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        memory.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # a kernel without transparent huge pages: 4 KB pages, as before
        pass
    out = torch.frombuffer(memory, dtype=t.dtype, count=t.numel()).view(t.shape)
    return out.copy_(t)  # the tensor keeps the mapping alive


def pack_int4(weight: torch.Tensor):
    """``(packed uint8 [N, K / 2], scales fp32 [N, K / 128], zeros fp32 [N, K / 128])`` of a
    ``[N, K]`` weight: asymmetric round-to-nearest per group, ``w ~ (q - zero) * scale``. The
    packed weight is in huge pages (``in_huge_pages``)."""
    w = weight.detach().float()
    n, k = w.shape
    g = w.view(n, k // GROUP_SIZE, GROUP_SIZE)
    lo, hi = g.amin(-1), g.amax(-1)
    scales = ((hi - lo) / 15).clamp(min=1e-12)
    zeros = -lo / scales
    q = torch.round(g / scales[..., None] + zeros[..., None]).clamp(0, 15).to(torch.uint8)
    halves = q.view(n, k // GROUP_SIZE, 2, GROUP_SIZE // 2)
    packed = halves[:, :, 0] | (halves[:, :, 1] << 4)
    return in_huge_pages(packed.reshape(n, k // 2).contiguous()), scales, zeros


def unpack_int4(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """The ``[N, K]`` float32 weight that ``pack_int4``'s output stands for."""
    n = packed.shape[0]
    g = packed.view(n, -1, GROUP_SIZE // 2)
    q = torch.stack([g & 15, g >> 4], dim=2).view(n, -1, GROUP_SIZE).float()
    return ((q - zeros[..., None]) * scales[..., None]).view(n, -1)


def pack_int8(weight: torch.Tensor):
    """``(int8 [N, K], scales fp32 [N])`` of a ``[N, K]`` weight: symmetric round-to-nearest
    per row, ``w ~ q * scale`` with ``q`` in -127..127. The int8 weight is in huge pages."""
    w = weight.detach().float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return in_huge_pages(q.contiguous()), scales


def _run(name: str, x: torch.Tensor, weight: torch.Tensor, columns: int, *extra) -> torch.Tensor:
    """``x [M, K] @ w.T`` as float32 ``[M, N]`` by the C function ``name``, whose arguments are
    ``x, M, K, weight, *extra, N, y, threads`` (``extra``: the weight's fp32 scales, zeros)."""
    kind = name.split("_")[0]
    x = x.float().contiguous()
    if not (x.is_cpu and weight.is_cpu):
        raise ValueError(
            f"the {kind} CPU kernel takes CPU tensors, not {x.device} and {weight.device}: "
            "quantize the model on the device it runs on"
        )
    if x.dim() != 2 or x.shape[1] != columns or columns % GROUP_SIZE:
        raise ValueError(f"x has shape {tuple(x.shape)}; the {kind} weight has {columns} columns")
    so = _functions(kind)
    n = weight.shape[0]
    y = x.new_empty(x.shape[0], n)
    tensors = [weight.contiguous(), *(t.float().contiguous() for t in extra)]
    pointers = [t.data_ptr() for t in tensors]
    status = getattr(so, name)(
        x.data_ptr(), x.shape[0], columns, *pointers, n, y.data_ptr(), torch.get_num_threads()
    )
    if status:
        raise RuntimeError(f"{name} failed (status {status}); K must be a multiple of {GROUP_SIZE}")
    return y


def _matmul_fake(x, weight, *rest):  # shape and dtype only, for torch.compile's tracing
    return x.new_empty(x.shape[0], weight.shape[0], dtype=torch.float32)


def _op(fake):
    """The decorated function as a torch custom op ``llama_mimi_tt::<name>`` with the fake
    function ``fake``: torch.compile keeps it in its graph as an opaque call, so a compiled
    decode step fuses the work around the kernels instead of breaking at every layer. Eager
    calls go to the function itself: the dispatcher costs 10-15 µs a call, about 1 ms of a
    decode step's 80 calls."""

    def wrap(fn):
        op = torch.library.custom_op(f"llama_mimi_tt::{fn.__name__}", fn, mutates_args=())
        op.register_fake(fake)

        @functools.wraps(fn)
        def call(*args):
            return op(*args) if torch.compiler.is_compiling() else fn(*args)

        return call

    return wrap


@_op(_matmul_fake)
def int8_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x [M, K] @ q.T`` as float32 ``[M, N]`` for ``pack_int8``'s int8 weight ``q``, without
    its scales (the caller applies them); x stays fp32, products summed in fp32."""
    return _run("int8_matmul", x, weight, weight.shape[1])


@_op(_matmul_fake)
def w4a8_matmul(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor
) -> torch.Tensor:
    """``x [M, K] @ w.T`` as float32 ``[M, N]`` for ``pack_int4``'s weight; x is quantized to
    int8 per group of 128 (quantize.quantize_activations) and the products summed as integers."""
    return _run("w4a8_matmul", x, packed, 2 * packed.shape[1], scales, zeros)


@_op(_matmul_fake)
def w8a8_matmul(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``x [M, K] @ w.T`` as float32 ``[M, N]`` for ``pack_int8``'s weight; x is quantized to
    int8 per group of 128 (quantize.quantize_activations) and the products summed as integers."""
    return _run("w8a8_matmul", x, weight, weight.shape[1], scales)


@_op(_matmul_fake)
def bf16_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x [M, K] @ w.T`` as float32 ``[M, N]`` for a bf16 weight ``[N, K]``; x is rounded to
    bf16, products summed in fp32."""
    if weight.dtype != torch.bfloat16:
        raise ValueError(f"bf16_matmul needs a bf16 weight, not {weight.dtype}")
    return _run("bf16_matmul", x, weight, weight.shape[1])


@_op(lambda q, k, v, valid, scale: torch.empty_like(q))
def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, scale: float
) -> torch.Tensor:
    """Softmax attention of one query per sequence over a KV cache, grouped-query, as float32
    ``[B, H, D]``: ``q [B, H, D]``, ``k`` and ``v`` ``[B, H_kv, L, D]`` float32 (query head
    ``j`` reads key/value head ``j // (H / H_kv)``), ``valid [B, L]`` bool (the positions each
    sequence attends to; at least one), scores scaled by ``scale``. Each cached row is read once
    for its group of query heads, and nothing after the last valid position: the key/value
    heads are never expanded."""
    b, h, d = q.shape
    if not all(t.is_cpu and t.dtype == torch.float32 for t in (q, k, v)):
        raise ValueError("decode_attention takes float32 CPU tensors")
    if k.shape != v.shape or k.dim() != 4 or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(
            f"q {tuple(q.shape)} does not match k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if valid.shape != (b, k.shape[2]) or valid.dtype != torch.bool:
        raise ValueError(
            f"valid must be bool {(b, k.shape[2])}, not {valid.dtype} {tuple(valid.shape)}"
        )
    so = _functions("attention")
    q, k, v, valid = (t.contiguous() for t in (q, k, v, valid))
    out = torch.empty_like(q)
    status = so.decode_attention(
        q.data_ptr(), b, h, k.shape[1], d, k.data_ptr(), v.data_ptr(), k.shape[2],
        valid.data_ptr(), scale, out.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    if status == 2:
        raise MemoryError("decode_attention: out of memory for the scores")
    if status:
        raise ValueError(
            f"decode_attention needs a head size that is a multiple of 16 (at most 256) and at "
            f"most 16 query heads per key/value head, not {d} and {h} / {k.shape[1]}"
        )
    return out


# Eager-only helpers of a decode step (fused_layers.py calls them outside torch.compile, which
# fuses this work itself): one C call each instead of 5-15 PyTorch ops of a few µs.
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """torchtune's ``RMSNorm`` of fp32 ``x [..., n]`` with fp32 ``weight [n]``."""
    if x.dtype != torch.float32 or weight.dtype != torch.float32:
        raise ValueError("rms_norm takes float32 CPU tensors")
    so = _functions("attention")
    x = x.contiguous()
    y = torch.empty_like(x)
    n = x.shape[-1]
    if so.rms_norm(
        x.data_ptr(), x.numel() // n, n, weight.contiguous().data_ptr(), eps, y.data_ptr()
    ):
        raise ValueError(f"rms_norm needs a width that is a multiple of 16, not {n}")
    return y


def rope(x: torch.Tensor, cache: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
    """torchtune's RoPE (``RotaryPositionalEmbeddings`` and ``Llama3ScaledRoPE``: pairs
    ``(2i, 2i + 1)`` rotated by ``cache [positions, d / 2, 2]`` = (cos, sin)) of fp32
    ``x [b, s, heads, d]`` (heads contiguous) at ``input_pos [b, s]``, as a new tensor."""
    b, s, heads, d = x.shape
    if x.dtype != torch.float32 or cache.dtype != torch.float32:
        raise ValueError("rope takes float32 CPU tensors")
    so = _functions("attention")
    if x.stride(3) != 1 or x.stride(2) != d:
        x = x.contiguous()
    pos = input_pos.to(torch.int64).expand(b, s).contiguous()
    cache = cache.contiguous()
    y = x.new_empty(b, s, heads, d)
    status = so.rope(
        x.data_ptr(), b, s, heads, d, x.stride(0), x.stride(1), cache.data_ptr(),
        cache.shape[0], pos.data_ptr(), y.data_ptr(),
    )  # fmt: skip
    if status:
        raise ValueError(
            f"rope: a position outside 0..{cache.shape[0] - 1} or an odd head size {d}"
        )
    return y

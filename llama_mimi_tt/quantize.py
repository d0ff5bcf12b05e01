"""Weight precision for inference: ``quantize: none | bf16 | int8 | int4 | w8a8 | w4a8``
(generate, eval, serve).

Batch-1 decoding reads every decoder weight once per token, so on a CPU its speed is set by the
bytes per weight. Only the ``nn.Linear`` layers of ``model.layers`` (973M of the 1.3B model's
weights read per token) are quantized: bf16 2 bytes per weight, int8 1 (a scale per output
row), int4 0.5 (+ a scale and zero per group of ``quantize_group_size`` columns). A name means
the same arithmetic on every machine of a device type, whichever code computes it:

- ``none``: the model as loaded, on PyTorch's code.
- ``bf16``, ``int8``, ``int4``: weight-only. Each quantized linear takes its input rounded to
  bf16, multiplies it by the dequantized weight with fp32 sums and rounds its output to bf16
  (PyTorch's bf16 matmul); int8 rounds the sum to bf16 before its per-row scale (in bf16), as
  a bf16 matmul followed by the scale does.
- ``w8a8``, ``w4a8``: int8 activations. Each input row is quantized to int8 per group of 128
  columns (:func:`quantize_activations`), the products are summed as integers and scaled in
  fp32; the weights as int8 and int4 above (int4 in groups of 128).

On a CPU the rest of the model computes in fp32 (attention and norms in bf16 are slower there),
on CUDA in bf16. Where this CPU has AVX-512 and gcc, the decode steps run on our kernels
(cpu_kernels.py), in layers whose q/k/v and gate/up projections are fused and whose decode steps
attend with our grouped-query kernel (fused_layers.py); elsewhere, or with
``LLAMA_MIMI_CPU_KERNELS=0``, on torchtune's layers and PyTorch's or torchao's code: bf16 and
int8 a bf16 matmul, w8a8 and w4a8 the same integer arithmetic in plain PyTorch. int4 is
torchao's ``Int4WeightOnlyConfig(version=1)`` on every machine (CPU layout; on CUDA
tensor-core tiled), and CUDA's int8 torchao's ``Int8WeightOnlyConfig``. Speed and quality per
precision and route: bench/bench_quantize.py and bench/RESULTS.md.
"""

import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from llama_mimi_tt import cpu_kernels
from llama_mimi_tt.errors import UserError
from llama_mimi_tt.fused_layers import fuse_layers

PRECISIONS = ("none", "bf16", "int8", "int4", "w8a8", "w4a8")
GROUP_SIZES = (32, 64, 128, 256)  # the int4 group sizes torchao's kernels accept
ACTIVATION_GROUP = cpu_kernels.GROUP_SIZE  # input columns per int8 activation scale (w8a8, w4a8)
_INT4_ROWS = 16  # the int4 CPU packing needs out_features divisible by 16
_ARITHMETIC = {  # what each precision computes, on every machine
    "bf16": "bf16 weights; linear inputs and outputs in bf16, fp32 sums",
    "int8": "int8 weight-only, per-row scales; linear inputs and outputs in bf16, fp32 sums",
    "int4": "int4 weight-only, group {group}; linear inputs and outputs in bf16, fp32 sums",
    "w8a8": "int8 weights per row, int8 activations per 128 columns, integer sums",
    "w4a8": "int4 weights per 128 columns, int8 activations per 128 columns, integer sums",
}


@dataclass(frozen=True)
class QuantSpec:
    """A parsed ``quantize`` setting.

    Args:
        precision (str): one of ``PRECISIONS``.
        group_size (int): input columns per int4 scale (int4; w4a8 takes 128 only). Default 128.
    """

    precision: str = "none"
    group_size: int = 128

    def activation_dtype(self, device: Optional[torch.device] = None) -> Optional[torch.dtype]:
        """The dtype the model computes in after quantization (None: unchanged): fp32 on a CPU
        (bf16 attention and norms are slower there), bf16 on CUDA. It does not depend on which
        code runs the layers, so a precision computes the same on every CPU."""
        if self.precision == "none":
            return None
        return torch.float32 if device is None or device.type == "cpu" else torch.bfloat16

    def describe(self, device: Optional[torch.device] = None) -> str:
        """One line for logs and summaries: what the precision computes, then the code that
        runs it here, e.g. ``int8 (int8 weight-only, ...; fp32 activations; PyTorch)``."""
        if self.precision == "none":
            return "none (weights as loaded, PyTorch)"
        on_cpu = device is None or device.type == "cpu"
        arithmetic = _ARITHMETIC[self.precision].format(group=self.group_size)
        activations = "fp32" if on_cpu else "bf16"
        if self.uses_cpu_kernel(device):
            route = "our AVX-512 kernels"
        elif self.precision == "int4":
            route = f"torchao {'Int4CPULayout' if on_cpu else 'tensor-core tiled'}"
        elif self.precision == "int8" and not on_cpu:
            route = "torchao"
        else:
            route = "PyTorch"
        return f"{self.precision} ({arithmetic}; {activations} activations; {route})"

    def uses_cpu_kernel(self, device: Optional[torch.device]) -> bool:
        """Whether the decoder layers run on our CPU kernels (cpu_kernels.py) rather than
        PyTorch's or torchao's code (none: never, the model runs as loaded; int4: never,
        torchao's ran faster than a kernel of ours, bench/RESULTS.md)."""
        return (
            self.precision in cpu_kernels.KERNELS
            and (device is None or device.type == "cpu")
            and cpu_kernels.available(self.precision)
        )


def parse_quantize(value, group_size=128) -> QuantSpec:
    """The ``quantize`` / ``quantize_group_size`` config values as a :class:`QuantSpec`.

    ``None``/``null`` and ``False`` mean ``none``; ``fp32`` is not a precision (use
    ``quantize: none`` with ``dtype: fp32``). A UserError names the key and the allowed values.
    """
    name = "none" if value is None or value is False else str(value).strip().lower()
    if name not in PRECISIONS:
        raise UserError(
            f"quantize={value!r} is not a known precision: use one of {', '.join(PRECISIONS)} "
            "(int4 also takes quantize_group_size). For fp32 weights use quantize=none dtype=fp32."
        )
    try:
        group = int(group_size)
    except (TypeError, ValueError):
        group = None
    if group not in GROUP_SIZES:
        raise UserError(
            f"quantize_group_size={group_size!r} is not supported: use one of "
            f"{', '.join(map(str, GROUP_SIZES))} (columns per int4 scale; 128 is the usual choice)"
        )
    if name == "w4a8" and group != ACTIVATION_GROUP:
        raise UserError(
            f"quantize=w4a8 takes groups of {ACTIVATION_GROUP} columns, not "
            f"quantize_group_size={group}: drop quantize_group_size, or use quantize=int4"
        )
    return QuantSpec(precision=name, group_size=group)


_GEMV_ROWS = 4  # our weight-only kernels run up to this many rows of input (decode steps)


def quantize_activations(x: torch.Tensor):
    """``(q, scales)``: the rows of ``x [M, K]`` as int8 values (held in fp32, ``[M, K / 128,
    128]``) with one fp32 scale per row and group of 128 columns (``[M, K / 128]``), as our
    w4a8/w8a8 kernels make them: scale ``max |x| / 127`` (1 for an all-zero group),
    ``q = round(x * (1 / scale))`` half to even, clamped to +-127."""
    g = x.float().reshape(x.shape[0], -1, ACTIVATION_GROUP)
    top = g.abs().amax(dim=-1)
    scales = torch.where(top > 0, top / 127.0, torch.ones_like(top))
    q = torch.round(g * (1.0 / scales)[..., None]).clamp(-127, 127)
    return q, scales


def _group_dots(xq: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    """``d [M, N, G]``: per group, the dot products of integer-valued ``xq [M, G, 128]`` and
    ``wq [N, G, 128]`` (|xq| <= 127, |wq| <= 255), exact in fp32 whatever the order of the sums
    (each below 2^24). Compiled, up to 4 rows of x (a decode step): products and sums, which
    inductor fuses into one pass over the weight; else batched matmuls over the groups, rows
    taken in chunks that keep ``d`` under 64 MB."""
    if xq.shape[0] <= _GEMV_ROWS and torch.compiler.is_compiling():
        return (xq[:, None] * wq[None]).sum(-1)
    n, groups = wq.shape[0], wq.shape[1]
    wt = wq.permute(1, 2, 0)  # [G, 128, N]
    step = max(1, 2**24 // (n * groups))
    parts = [
        torch.bmm(xq[i : i + step].transpose(0, 1), wt).permute(1, 2, 0)
        for i in range(0, xq.shape[0], step)
    ]
    return torch.cat(parts)


def round_to_bf16(t: torch.Tensor) -> torch.Tensor:
    """The fp32 tensor ``t`` rounded to the nearest bf16 value (half to even), kept in fp32:
    ``t.to(torch.bfloat16).float()`` for finite values, in integer arithmetic, which
    ``torch.compile`` keeps as it is (inductor drops the rounding of a fused down-and-up cast)."""
    bits = t.float().contiguous().view(torch.int32)
    bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & -65536
    return bits.view(torch.float32)


def _gemv(x: torch.Tensor, on_kernel: bool) -> bool:
    return on_kernel and x.is_cpu and x.numel() // x.shape[-1] <= _GEMV_ROWS


class Bf16Linear(nn.Linear):
    """A bias-free linear layer with a bf16 weight: input rounded to bf16, fp32 sums, output
    rounded to bf16 and returned in the input's dtype. Decode steps (at most 4 rows of input)
    run on our AVX512_BF16 kernel (:mod:`cpu_kernels`) where ``cpu_kernel``, else and for
    longer inputs ``F.linear`` in bf16. Its state dict is an ``nn.Linear``'s.
    """

    @classmethod
    def of(cls, weight: torch.Tensor) -> "Bf16Linear":
        """The layer of a bias-free linear's ``weight``, in bf16 (in huge pages on a CPU)."""
        layer = cls(weight.shape[1], weight.shape[0], bias=False, device="meta")
        dense = cpu_kernels.in_huge_pages(weight.to(torch.bfloat16))
        layer.weight = nn.Parameter(dense, requires_grad=False)
        layer.cpu_kernel = cpu_kernels.available("bf16")  # decided once: forward stays traceable
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _gemv(x, getattr(self, "cpu_kernel", False)):
            return F.linear(x.to(torch.bfloat16), self.weight).to(x.dtype)
        y = round_to_bf16(cpu_kernels.bf16_matmul(x.reshape(-1, x.shape[-1]), self.weight))
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


class Int8Linear(nn.Module):
    """A bias-free linear layer with an int8 weight ``[out, in]`` and one scale per output row
    (symmetric, round to nearest, ``cpu_kernels.pack_int8``), weight-only:
    ``y = bf16(bf16(x_bf16 @ q.T) * bf16(scale))``, returned in the input's dtype (compiled,
    PyTorch's route rounds once instead of twice: 1 bf16 step apart at most). It reads 1 byte
    per weight. Decode steps run on our AVX-512 kernel where ``cpu_kernel``, else and for
    longer inputs a bf16 matmul.
    """

    kernel = "int8"
    scale_dtype = torch.bfloat16  # stored as used (inductor cannot take a cast scale here)

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        q, scales = cpu_kernels.pack_int8(weight)
        self.out_features, self.in_features = q.shape
        self.register_buffer("weight_int8", q)
        self.register_buffer("scales", scales.to(self.scale_dtype))
        self.cpu_kernel = cpu_kernels.available(self.kernel)  # decided once: traceable

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        if _gemv(x, self.cpu_kernel):
            sums = round_to_bf16(cpu_kernels.int8_matmul(round_to_bf16(x2), self.weight_int8))
            y = round_to_bf16(sums * self.scales.float())
        else:  # in this form inductor compiles it to PyTorch's int8 weight-only matmul
            weight = self.weight_int8.t().to(torch.bfloat16)
            y = torch.mm(x2.to(torch.bfloat16), weight) * self.scales
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def dequantize(self) -> torch.Tensor:
        """The weight as ``float32`` ``[out, in]`` (for checks)."""
        return self.weight_int8.float() * self.scales.float()[:, None]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.kernel}"


class W8A8Linear(Int8Linear):
    """:class:`Int8Linear`'s weight with int8 activations: each input row quantized per group of
    128 columns (:func:`quantize_activations`), integer products, then the scales, in fp32.
    Our AVX-512 VNNI kernel where ``cpu_kernel``, else the same arithmetic in PyTorch."""

    kernel = "w8a8"
    scale_dtype = torch.float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]).float()
        if self.cpu_kernel and x.is_cpu:
            y = cpu_kernels.w8a8_matmul(x2, self.weight_int8, self.scales)
        else:
            xq, sx = quantize_activations(x2)
            wq = self.weight_int8.float().view(self.out_features, -1, ACTIVATION_GROUP)
            y = (_group_dots(xq, wq) * sx[:, None, :]).sum(-1) * self.scales
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


class W4A8Linear(nn.Module):
    """A bias-free linear layer with int4 weights (a scale and a zero per 128 input columns,
    asymmetric, round to nearest, ``cpu_kernels.pack_int4``; 0.5625 bytes per weight) and int8
    activations: each input row quantized per group of 128 columns
    (:func:`quantize_activations`), integer products ``q * xq`` per group, then
    ``s * sx * (dot - z * sum(xq))`` summed in fp32. Our AVX-512 VNNI kernel where
    ``cpu_kernel``, else the same arithmetic in PyTorch."""

    kernel = "w4a8"

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        packed, scales, zeros = cpu_kernels.pack_int4(weight)
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight_int4", packed)
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)
        self.cpu_kernel = cpu_kernels.available(self.kernel)  # decided once: traceable

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]).float()
        if self.cpu_kernel and x.is_cpu:
            y = cpu_kernels.w4a8_matmul(x2, self.weight_int4, self.scales, self.zeros)
        else:
            xq, sx = quantize_activations(x2)
            n, half = self.weight_int4.shape[0], ACTIVATION_GROUP // 2
            g = self.weight_int4.view(n, -1, half)
            wq = torch.cat([g & 15, g >> 4], dim=2).float()  # [N, G, 128], q in 0..15
            dots = _group_dots(xq, wq) - self.zeros * xq.sum(-1)[:, None, :]
            y = (dots * self.scales * sx[:, None, :]).sum(-1)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def dequantize(self) -> torch.Tensor:
        """The weight as ``float32`` ``[out, in]`` (for checks)."""
        return cpu_kernels.unpack_int4(self.weight_int4, self.scales, self.zeros)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, w4a8"


class InBf16(nn.Module):
    """Runs ``linear`` (a bf16 layer, e.g. torchao's int4) on the input rounded to bf16 and
    returns the input's dtype: a bf16 matmul inside a model that computes in fp32."""

    def __init__(self, linear: nn.Module):
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.to(torch.bfloat16)).to(x.dtype)


def _replace_linears(model: nn.Module, make) -> None:
    """Every bias-free linear of the decoder layers by ``make(linear)`` (check_quantizable
    refuses biases except for bf16, which keeps a biased layer as it is)."""
    for name, lin in _layer_linears(model):
        if lin.bias is not None:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, make(lin))


def _layer_linears(model: nn.Module):
    """``(name, module)`` of every ``nn.Linear`` inside ``model.layers``."""
    layers = getattr(model, "layers", None)
    if layers is None:
        raise UserError(
            f"quantize: {type(model).__name__} has no decoder `layers`; quantize applies to "
            "torchtune decoders (TransformerDecoder)"
        )
    return [(f"layers.{n}", m) for n, m in layers.named_modules() if isinstance(m, nn.Linear)]


def check_quantizable(model: nn.Module, spec: QuantSpec, device: torch.device) -> None:
    """A UserError, before any weight is touched, when ``spec`` cannot run on this model and
    device (the device type, biases, int4 group size and row counts)."""
    if spec.precision in ("none", "bf16"):
        return
    if device.type not in ("cpu", "cuda"):
        raise UserError(
            f"quantize={spec.precision} runs on cpu and cuda, not on {device.type}: use "
            "quantize=bf16 (or none) on this device"
        )
    linears = _layer_linears(model)
    if not linears:
        raise UserError(f"quantize={spec.precision}: the model has no nn.Linear layers to quantize")
    for name, m in linears:
        if m.bias is not None:
            raise UserError(
                f"quantize={spec.precision}: {name} has a bias; only bias-free linear layers "
                "(Llama's) are supported"
            )
        if spec.precision in ("int4", "w4a8", "w8a8"):
            group = ACTIVATION_GROUP if spec.precision == "w8a8" else spec.group_size
            if m.in_features % group:
                what = "with quantize_group_size=" if spec.precision == "int4" else "in groups of "
                raise UserError(
                    f"quantize={spec.precision} {what}{group}: {name} has {m.in_features} "
                    f"input features, not a multiple of {group}. Use int4 with a group size "
                    f"that divides every layer's input features "
                    f"({', '.join(map(str, GROUP_SIZES))}), or quantize=int8 / bf16."
                )
        if spec.precision == "int4" and device.type == "cpu" and m.out_features % _INT4_ROWS:
            raise UserError(
                f"quantize=int4 on cpu: {name} has {m.out_features} output features, not "
                f"a multiple of {_INT4_ROWS} (the int4 CPU packing's tile); use "
                "quantize=int8 or bf16 for this model"
            )


def _int4_config(spec: QuantSpec, device: torch.device):
    from torchao.quantization import Int4WeightOnlyConfig

    if device.type == "cpu":
        from torchao.dtypes import Int4CPULayout

        return Int4WeightOnlyConfig(group_size=spec.group_size, version=1, layout=Int4CPULayout())
    return Int4WeightOnlyConfig(group_size=spec.group_size, version=1)  # tensor-core tiled


@torch.no_grad()
def quantize_model(model: nn.Module, spec: QuantSpec, device: torch.device) -> nn.Module:
    """Applies ``spec`` to a loaded torchtune decoder in place and returns it.

    ``none`` leaves the model as it was loaded (PyTorch's own code). Every other precision casts
    the whole model to its ``activation_dtype`` (the activations, norms, embedding, output
    projection and KV cache follow it: fp32 on a CPU, bf16 on CUDA), then replaces the decoder
    layers' linear layers. Where our CPU kernels run the precision, q/k/v and gate/up are fused
    first (``fuse_layers``; the state dict then has ``qkv_proj`` and ``gate_up_proj`` keys:
    quantize for inference, never to save) and the layers are :class:`Bf16Linear`,
    :class:`Int8Linear`, :class:`W8A8Linear` or :class:`W4A8Linear` on our kernels. Elsewhere
    the same classes run PyTorch's code. int4 is torchao's ``quantize_`` everywhere (wrapped in
    :class:`InBf16` on a CPU); CUDA's int8 is torchao's and CUDA's bf16 ``nn.Linear`` in the
    bf16 model. Call it after the weights are loaded and before
    generation or scoring.
    """
    check_quantizable(model, spec, device)
    if spec.precision == "none":
        return model
    model.to(device=device, dtype=spec.activation_dtype(device))
    ours = spec.uses_cpu_kernel(device)
    if ours:
        fuse_layers(model)  # q/k/v and gate/up as one projection each, our decode attention
    if spec.precision == "int8" and device.type == "cuda":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        # compiled, torchao's int8 fuses the dequantization into the matmul; aten's CUDA
        # int8 weight-only matmul ran 10x slower than bf16 (bench/RESULTS.md, H200)
        quantize_(model.layers, Int8WeightOnlyConfig())
    elif spec.precision == "int4":
        _torchao_int4(model, spec, device)
    elif spec.precision != "bf16" or device.type == "cpu":
        make = {
            "bf16": Bf16Linear.of,
            "int8": Int8Linear,
            "w8a8": W8A8Linear,
            "w4a8": W4A8Linear,
        }[spec.precision]
        _replace_linears(model, lambda lin: make(lin.weight).to(device))
    return model.eval()


def _torchao_int4(model: nn.Module, spec: QuantSpec, device: torch.device) -> None:
    """int4 by torchao's ``quantize_`` on bf16 copies of the decoder linears (its CPU kernel
    runs bf16 inputs 3-4x faster than fp32 ones), each wrapped in :class:`InBf16` on a CPU."""
    from torchao.quantization import quantize_

    for _, lin in _layer_linears(model):
        lin.to(torch.bfloat16)
    with warnings.catch_warnings():
        # torchao 0.15 marks version 1 deprecated, but its version 2 has no CPU int4 packing
        warnings.filterwarnings("ignore", message=".*version 1 of Int4WeightOnlyConfig")
        quantize_(model.layers, _int4_config(spec, device))
    left = [n for n, m in _layer_linears(model) if type(m.weight) is nn.Parameter]
    if left:  # torchao skips a layer it cannot handle without a word
        raise UserError(f"quantize=int4: torchao left {left[0]} unquantized")
    if device.type == "cpu":
        _replace_linears(model, InBf16)


def weight_bytes_per_token(model: nn.Module) -> int:
    """Bytes of the decoder layers' weights (plain, int8 with its scales, or torchao int4 with
    its scales and zeros), the part of the model read once per generated token. Buffers such
    as the RoPE cache are not counted."""
    total = 0
    for m in model.layers.modules():
        tensors = list(m.parameters(recurse=False))
        if isinstance(m, Int8Linear):
            tensors += [m.weight_int8, m.scales]
        if isinstance(m, W4A8Linear):
            tensors += [m.weight_int4, m.scales, m.zeros]
        total += sum(_nbytes(t) for t in tensors)
    return total


def _nbytes(t: torch.Tensor) -> int:
    inner = getattr(t, "__tensor_flatten__", None)
    if inner is None:
        return t.numel() * t.element_size()
    names, _ = inner()
    return sum(_nbytes(getattr(t, n)) for n in names)

"""Weight precision for inference: ``quantize: none | bf16 | int8 | int4`` (generate, eval, serve).

Batch-1 decoding reads every decoder weight once per token, so on a CPU its speed is set by the
bytes per weight. Only the ``nn.Linear`` layers of ``model.layers`` (973M of the 1.3B model's
weights read per token) are quantized; the rest is cast to the activation dtype (fp32 on our
CPU kernels, else bf16): bf16 2 bytes per weight, int8 1 (a scale per output row), int4 0.5
(+ a scale and zero per group of ``quantize_group_size`` columns). On CPUs with AVX-512 the
decode steps run on our matrix-vector kernels (cpu_kernels.py), which stream the weights
1.5-2x faster than PyTorch's: :class:`Bf16Linear`, :class:`Int8Linear` and
:class:`Int4Linear`, in layers whose
q/k/v and gate/up projections are fused and whose decode steps attend with our grouped-query
kernel (fused_layers.py): four kernel calls a layer instead of seven. Elsewhere bf16 is
``F.linear``, int8 aten's ``_weight_int8pack_mm`` (torchao's ``Int8WeightOnlyConfig`` on CUDA)
and int4 torchao's ``Int4WeightOnlyConfig(version=1)``. Speed and quality per precision, CPU
and GPU: bench/bench_quantize.py and bench/RESULTS.md.
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

PRECISIONS = ("none", "bf16", "int8", "int4")
GROUP_SIZES = (32, 64, 128, 256)  # the int4 group sizes torchao's kernels accept
_INT4_ROWS = 16  # the int4 CPU packing needs out_features divisible by 16


@dataclass(frozen=True)
class QuantSpec:
    """A parsed ``quantize`` setting.

    Args:
        precision (str): one of ``none``, ``bf16``, ``int8``, ``int4``.
        group_size (int): input columns per int4 scale (int4 only). Default 128.
    """

    precision: str = "none"
    group_size: int = 128

    def activation_dtype(self, device: Optional[torch.device] = None) -> Optional[torch.dtype]:
        """The dtype the model computes in after quantization (None: unchanged): fp32 where
        the layers run on our CPU kernels (bf16 attention and norms are slower than fp32 on a
        CPU, and the kernels take fp32 input), else bf16."""
        if self.precision == "none":
            return None
        return torch.float32 if self.uses_cpu_kernel(device) else torch.bfloat16

    def describe(self, device: Optional[torch.device] = None) -> str:
        """One line for logs and summaries, e.g. ``int8 (per-row scales), bf16 activations``."""
        if self.precision == "none":
            return "none (weights as loaded)"
        if self.uses_cpu_kernel(device):
            weights = {
                "bf16": "bf16 (our AVX512_BF16 kernel for decode steps)",
                "int8": "int8 (per-row scales, our AVX-512 VNNI kernel, int8 activations per group)",
                "int4": "int4 (group 128, our AVX-512 VNNI kernel, int8 activations per group)",
            }[self.precision]
            return f"{weights}, fp32 activations"
        on_cpu = device is None or device.type == "cpu"
        if self.precision == "bf16":
            return "bf16 weights and activations"
        if self.precision == "int8":
            return f"int8 (per-row scales, {'aten' if on_cpu else 'torchao'}), bf16 activations"
        layout = "Int4CPULayout" if on_cpu else "tensor-core tiled"
        return f"int4 (group {self.group_size}, torchao {layout}), bf16 activations"

    def uses_cpu_kernel(self, device: Optional[torch.device]) -> bool:
        """Whether the decoder layers run on our CPU kernels (cpu_kernels.py) rather than
        PyTorch's or torchao's (int4: group 128 only; none: never, the model runs as loaded)."""
        return (
            self.precision != "none"
            and (device is None or device.type == "cpu")
            and (self.precision != "int4" or self.group_size == cpu_kernels.GROUP_SIZE)
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
    return QuantSpec(precision=name, group_size=group)


_GEMV_ROWS = 4  # our bf16 kernel is faster than PyTorch's up to this many rows of input


class Bf16Linear(nn.Linear):
    """A bias-free linear layer with a bf16 weight whose matrix-vector products (at most 4 rows
    of input: a decode step) run on our AVX512_BF16 kernel (:mod:`cpu_kernels`), 1.5x
    PyTorch's at batch 1; longer inputs (a prompt, a scored sequence) go through ``F.linear``
    in the weight's dtype. Either way the output has the input's dtype. Its state dict is an
    ``nn.Linear``'s.
    """

    weight_dtype = torch.bfloat16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows > _GEMV_ROWS or not x.is_cpu:
            return F.linear(x.to(self.weight.dtype), self.weight).to(x.dtype)
        y = self._kernel(x.reshape(rows, -1), self.weight)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    @staticmethod
    def _kernel(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return cpu_kernels.bf16_matmul(x, weight)

    @classmethod
    def of(cls, weight: torch.Tensor) -> "Bf16Linear":
        """The layer of a bias-free linear's ``weight``, in ``weight_dtype`` (in huge pages on
        a CPU)."""
        layer = cls(weight.shape[1], weight.shape[0], bias=False, device="meta")
        dense = cpu_kernels.in_huge_pages(weight.to(cls.weight_dtype))
        layer.weight = nn.Parameter(dense, requires_grad=False)
        return layer


class Int8Linear(nn.Module):
    """A bias-free linear layer with an int8 weight ``[out, in]`` and one scale per output row
    (symmetric, round to nearest): ``y = (x @ w_int8.T) * scale``. It reads 1 byte per weight.

    On a CPU with AVX-512 VNNI it runs our kernel (:mod:`cpu_kernels`, activations quantized to
    int8 per group of 128), elsewhere ``torch.ops.aten._weight_int8pack_mm``, PyTorch's public
    operator for this layout (bf16 activations).
    """

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        q, scales = cpu_kernels.pack_int8(weight)
        self.out_features, self.in_features = q.shape
        self.register_buffer("weight_int8", q)
        self.register_buffer("scales", scales)
        self.cpu_kernel = cpu_kernels.available("int8")  # decided once: forward stays traceable

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x.is_cpu and self.cpu_kernel:
            y = cpu_kernels.int8_matmul(x2, self.weight_int8, self.scales).to(x.dtype)
        else:
            y = torch.ops.aten._weight_int8pack_mm(x2, self.weight_int8, self.scales.to(x.dtype))
        return y.reshape(*shape[:-1], self.out_features)

    def dequantize(self) -> torch.Tensor:
        """The weight as ``float32`` ``[out, in]`` (for checks)."""
        return self.weight_int8.float() * self.scales.float()[:, None]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


class Int4Linear(nn.Module):
    """A bias-free linear layer with int4 weights (a scale and a zero per 128 input columns,
    asymmetric, round to nearest) run by our AVX-512 VNNI kernel (:mod:`cpu_kernels`), which
    also quantizes the activations to int8 per group of 128. It reads 0.5625 bytes per weight.
    """

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        packed, scales, zeros = cpu_kernels.pack_int4(weight)
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight_int4", packed)
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        y = cpu_kernels.int4_matmul(x2, self.weight_int4, self.scales, self.zeros)
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def dequantize(self) -> torch.Tensor:
        """The weight as ``float32`` ``[out, in]`` (for checks)."""
        return cpu_kernels.unpack_int4(self.weight_int4, self.scales.float(), self.zeros.float())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4"


def _replace_linears(model: nn.Module, make) -> None:
    """Every bias-free linear of the decoder layers by ``make(weight)`` (check_quantizable
    refuses biases for int8 and int4; bf16 keeps a biased layer as it is)."""
    for name, lin in _layer_linears(model):
        if lin.bias is not None:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, make(lin.weight))


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
        if spec.precision == "int4":
            if m.in_features % spec.group_size:
                raise UserError(
                    f"quantize=int4 with quantize_group_size={spec.group_size}: {name} has "
                    f"{m.in_features} input features, not a multiple of the group size. Use a "
                    f"group size that divides every layer's input features "
                    f"({', '.join(map(str, GROUP_SIZES))}), or quantize=int8 / bf16."
                )
            if device.type == "cpu" and m.out_features % _INT4_ROWS:
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
    the whole model to its
    ``activation_dtype`` (the activations, norms, embedding, output projection and KV cache
    follow it: fp32 on our CPU kernels, else bf16), then replaces the decoder layers' linear
    layers: on our CPU kernels by :class:`Bf16Linear`, :class:`Int8Linear` or
    :class:`Int4Linear`, after fusing q/k/v and gate/up (``fuse_layers``; the state dict then
    has ``qkv_proj`` and ``gate_up_proj`` keys: quantize for inference, never to save);
    elsewhere int8 by :class:`Int8Linear` (torchao's on CUDA), int4 by
    torchao's ``quantize_`` and bf16 stays ``nn.Linear``. Call it after the weights are loaded
    and before generation or scoring.
    """
    check_quantizable(model, spec, device)
    if spec.precision == "none":
        return model
    model.to(device=device, dtype=spec.activation_dtype(device))
    if spec.uses_cpu_kernel(device):
        fuse_layers(model)  # q/k/v and gate/up as one projection each, our decode attention
        make = {"bf16": Bf16Linear.of, "int8": Int8Linear, "int4": Int4Linear}[spec.precision]
        _replace_linears(model, make)
    elif spec.precision == "int8" and device.type == "cuda":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        # compiled, torchao's int8 fuses the dequantization into the matmul; aten's CUDA
        # _weight_int8pack_mm ran 10x slower than bf16 (bench/RESULTS.md, H200)
        quantize_(model.layers, Int8WeightOnlyConfig())
    elif spec.precision == "int8":
        _replace_linears(model, lambda w: Int8Linear(w).to(device))
    elif spec.precision == "int4":
        from torchao.quantization import quantize_

        with warnings.catch_warnings():
            # torchao 0.15 marks version 1 deprecated, but its version 2 has no CPU int4 packing
            warnings.filterwarnings("ignore", message=".*version 1 of Int4WeightOnlyConfig")
            quantize_(model.layers, _int4_config(spec, device))
        left = [n for n, m in _layer_linears(model) if type(m.weight) is nn.Parameter]
        if left:  # torchao skips a layer it cannot handle without a word
            raise UserError(f"quantize=int4: torchao left {left[0]} unquantized")
    return model.eval()


def weight_bytes_per_token(model: nn.Module) -> int:
    """Bytes of the decoder layers' weights (plain, int8 with its scales, or torchao int4 with
    its scales and zeros), the part of the model read once per generated token. Buffers such
    as the RoPE cache are not counted."""
    total = 0
    for m in model.layers.modules():
        tensors = list(m.parameters(recurse=False))
        if isinstance(m, Int8Linear):
            tensors += [m.weight_int8, m.scales]
        if isinstance(m, Int4Linear):
            tensors += [m.weight_int4, m.scales, m.zeros]
        total += sum(_nbytes(t) for t in tensors)
    return total


def _nbytes(t: torch.Tensor) -> int:
    inner = getattr(t, "__tensor_flatten__", None)
    if inner is None:
        return t.numel() * t.element_size()
    names, _ = inner()
    return sum(_nbytes(getattr(t, n)) for n in names)

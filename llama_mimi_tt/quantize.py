"""Weight precision for inference: ``quantize: none | bf16 | int8 | int4`` (generate, eval, serve).

Batch-1 decoding reads every decoder weight once per token, so on a CPU its speed is set by the
bytes per weight. Only the ``nn.Linear`` layers of ``model.layers`` (973M of the 1.3B model's
weights read per token) are quantized; the rest is cast to bf16, as are the activations:
bf16 2 bytes per weight, int8 1 (a scale per output row), int4 0.5 (+ a scale and zero per group
of ``quantize_group_size`` columns). int4 on a CPU with AVX-512 VNNI is :class:`Int4Linear`,
our kernel (cpu_kernels.py, 1.45x PyTorch's int4 CPU kernel), else torchao's
``Int4WeightOnlyConfig(version=1)``; int8 is :class:`Int8Linear` (aten's ``_weight_int8pack_mm``) on CPU,
where torchao's int8 is slower than fp32, and torchao's ``Int8WeightOnlyConfig`` on CUDA. Speed and
quality per precision, CPU and GPU: bench/bench_quantize.py and bench/RESULTS.md.
"""

import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from llama_mimi_tt import cpu_kernels
from llama_mimi_tt.errors import UserError

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

    @property
    def activation_dtype(self) -> Optional[torch.dtype]:
        """The dtype the model computes in after quantization (None: unchanged)."""
        return None if self.precision == "none" else torch.bfloat16

    def describe(self, device: Optional[torch.device] = None) -> str:
        """One line for logs and summaries, e.g. ``int8 (per-row scales), bf16 activations``."""
        if self.precision == "none":
            return "none (weights as loaded)"
        if self.precision == "bf16":
            return "bf16 weights and activations"
        if self.precision == "int8":
            kernel = "torchao" if device is not None and device.type == "cuda" else "aten"
            return f"int8 (per-row scales, {kernel}), bf16 activations"
        if self.uses_cpu_kernel(device):
            return "int4 (group 128, our AVX-512 VNNI kernel), int8 activations per group"
        layout = "Int4CPULayout" if device is None or device.type == "cpu" else "tensor-core tiled"
        return f"int4 (group {self.group_size}, torchao {layout}), bf16 activations"

    def uses_cpu_kernel(self, device: Optional[torch.device]) -> bool:
        """Whether int4 runs on our CPU kernel (cpu_kernels.py) rather than torchao's."""
        return (
            self.precision == "int4"
            and (device is None or device.type == "cpu")
            and self.group_size == cpu_kernels.GROUP_SIZE
            and cpu_kernels.available()
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


class Int8Linear(nn.Module):
    """A bias-free linear layer with an int8 weight ``[out, in]`` and one scale per output row
    (symmetric, round to nearest): ``y = (x @ w_int8.T) * scale``.

    ``torch.ops.aten._weight_int8pack_mm`` is PyTorch's public aten operator for exactly this
    (CPU and CUDA kernels); it reads the int8 weight as it is stored, so a token reads 1 byte
    per weight. The scales are kept in the activation dtype, as the operator requires.
    """

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        w = weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        self.out_features, self.in_features = w.shape
        self.register_buffer("weight_int8", q.contiguous())
        self.register_buffer("scales", scale.to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        scales = self.scales if self.scales.dtype == x.dtype else self.scales.to(x.dtype)
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, shape[-1]), self.weight_int8, scales)
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

    @torch.compiler.disable  # a call into C: nothing for the compiler to trace
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        scales, zeros = self.scales.float(), self.zeros.float()  # fp32 even after a model.to()
        y = cpu_kernels.int4_matmul(x.reshape(-1, shape[-1]), self.weight_int4, scales, zeros)
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def dequantize(self) -> torch.Tensor:
        """The weight as ``float32`` ``[out, in]`` (for checks)."""
        return cpu_kernels.unpack_int4(self.weight_int4, self.scales.float(), self.zeros.float())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4"


def _replace_linears(model: nn.Module, make) -> None:
    for name, lin in _layer_linears(model):
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

    ``none`` leaves the model as it is. Every other precision casts the whole model to bf16
    (the activations, norms, embedding, output projection and KV cache follow it), then
    replaces the decoder layers' linear weights: int8 by :class:`Int8Linear` (torchao on CUDA),
    int4 by :class:`Int4Linear` on CPUs with AVX-512 VNNI (group 128), else torchao's ``quantize_``. Call it after the weights are loaded and before generation or scoring.
    """
    check_quantizable(model, spec, device)
    if spec.precision == "none":
        return model
    model.to(device=device, dtype=torch.bfloat16)
    if spec.precision == "int8" and device.type == "cuda":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        # compiled, torchao's int8 fuses the dequantization into the matmul; aten's CUDA
        # _weight_int8pack_mm ran 10x slower than bf16 (bench/RESULTS.md, H200)
        quantize_(model.layers, Int8WeightOnlyConfig())
    elif spec.precision == "int8":
        _replace_linears(model, lambda w: Int8Linear(w, torch.bfloat16).to(device))
    elif spec.uses_cpu_kernel(device):
        _replace_linears(model, Int4Linear)
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

"""Decoder layers with fused projections, for decoding on our CPU kernels (``quantize``).

A decode step is one matrix-vector product per linear layer, and on a 2-core CPU each call
costs 10-30 µs besides streaming its weight; torchtune's Llama layer makes seven of them (q, k,
v, output, gate, up, down), and attends by first copying the 8 key/value heads of the whole
cache into 32. Here q, k and v are one projection, gate and up another (four calls a layer),
RoPE is applied to q and k together, and a decode step attends with our grouped-query kernel
(``cpu_kernels.decode_attention``), which reads each cached row once and stops at the last
valid position. In eager decode steps RoPE and the RMS norms are one C call each (compiled,
inductor fuses them). Longer inputs (the prompt, scoring) keep torchtune's attention. The
outputs are those of torchtune's layers (same weights, same RoPE, same masks); the state dict
is not (``qkv_proj`` and ``gate_up_proj`` replace ``q/k/v_proj`` and ``w1/w3``): these layers
are for inference after loading, never for checkpoints.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torchtune.models.llama3_1 import Llama3ScaledRoPE
from torchtune.modules import FeedForward, MultiHeadAttention, RMSNorm, RotaryPositionalEmbeddings

from llama_mimi_tt import cpu_kernels


class FusedAttention(MultiHeadAttention):
    """torchtune's self-attention (same KV cache, RoPE, masks and output projection) with q, k
    and v computed by one projection ``qkv_proj`` (their weights stacked by rows), and decode
    steps attended by ``cpu_kernels.decode_attention``. Made by :func:`fuse_layers`."""

    def __init__(self, attn: MultiHeadAttention, qkv_proj: nn.Module):
        super().__init__(
            embed_dim=attn.embed_dim,
            num_heads=attn.num_heads,
            num_kv_heads=attn.num_kv_heads,
            head_dim=attn.head_dim,
            q_proj=nn.Identity(),
            k_proj=nn.Identity(),
            v_proj=nn.Identity(),
            output_proj=attn.output_proj,
            pos_embeddings=attn.pos_embeddings,
            kv_cache=attn.kv_cache,
            max_seq_len=attn.max_seq_len,
            is_causal=attn.is_causal,
            attn_dropout=attn.attn_dropout,
        )
        del self.q_proj, self.k_proj, self.v_proj  # one projection instead
        self.qkv_proj = qkv_proj
        self.cache_enabled = attn.cache_enabled
        self.cpu_kernels = cpu_kernels.available("attention")  # decided once: traceable

    def forward(
        self,
        x: torch.Tensor,
        y: Optional[torch.Tensor] = None,
        *,
        mask: Optional[torch.Tensor] = None,
        input_pos: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """``x`` ``[b, s, d]``; ``y`` must be ``x`` (self-attention); ``mask`` as torchtune's
        (bool ``[b, s, L]``, True where attended) or None (causal)."""
        if y is not x:
            raise ValueError("FusedAttention is self-attention only: call it as attn(x, x)")
        b, s, _ = x.shape
        heads, kv_heads, dim = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(x)
        qk = qkv[..., : (heads + kv_heads) * dim].view(b, s, heads + kv_heads, dim)
        if self.pos_embeddings is not None:  # the same positions for q and k: one call
            qk = self._rope(qk, input_pos)
        q, k = qk.split([heads, kv_heads], dim=2)
        v = qkv[..., (heads + kv_heads) * dim :].view(b, s, kv_heads, dim)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self.kv_cache is not None and self.cache_enabled:
            k, v = self.kv_cache.update(k, v)
        if self.cpu_kernels and _decode_step(q, k, mask):
            out = cpu_kernels.decode_attention(
                q.reshape(b, heads, dim), k, v, mask.reshape(b, -1), dim**-0.5
            )
        else:
            if heads != kv_heads:  # as torchtune: query head j reads key/value head j // group
                k = k.repeat_interleave(heads // kv_heads, dim=1)
                v = v.repeat_interleave(heads // kv_heads, dim=1)
            out = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=None if mask is None else mask[:, None],
                is_causal=mask is None and self.kv_cache is None and self.is_causal,
            ).transpose(1, 2)
        return self.output_proj(out.reshape(b, s, heads * dim))

    def _rope(self, qk: torch.Tensor, input_pos: Optional[torch.Tensor]) -> torch.Tensor:
        """torchtune's RoPE; in eager decode steps (at most 4 positions) our C loop over its
        cos/sin cache, 8 µs against 53 µs."""
        if (
            self.cpu_kernels
            and not torch.compiler.is_compiling()  # compiled, inductor fuses it
            and input_pos is not None
            and qk.shape[1] <= _SMALL
            and qk.is_cpu
            and qk.dtype == torch.float32
            and type(self.pos_embeddings) in _ROPES
            and self.pos_embeddings.cache.dtype == torch.float32
        ):
            return cpu_kernels.rope(qk, self.pos_embeddings.cache, input_pos)
        return self.pos_embeddings(qk, input_pos=input_pos)


_SMALL = 4  # positions per sequence up to which the eager RMS norm and RoPE run in C
_ROPES = (RotaryPositionalEmbeddings, Llama3ScaledRoPE)  # cache [positions, d / 2, (cos, sin)]


def _decode_step(q: torch.Tensor, k: torch.Tensor, mask: Optional[torch.Tensor]) -> bool:
    """Whether our decode attention takes this call: one fp32 CPU query per sequence over a
    cache whose positions the bool mask ``[b, 1, L]`` gives, with head sizes and groups the
    kernel handles (head size a multiple of 16 up to 256, at most 16 query heads per group);
    anything else goes to SDPA."""
    return (
        q.shape[2] == 1
        and q.is_cpu
        and q.dtype == torch.float32
        and mask is not None
        and mask.dtype == torch.bool
        and mask.shape == (q.shape[0], 1, k.shape[2])
        and q.shape[3] % 16 == 0
        and q.shape[3] <= 256
        and q.shape[1] <= 16 * k.shape[1]
    )


class DecodeRMSNorm(RMSNorm):
    """torchtune's ``RMSNorm`` (same ``scale``, same output) whose eager decode steps (fp32,
    at most 4 rows) run in C: 4 µs against 17 µs, twice a layer."""

    def __init__(self, norm: RMSNorm):
        super().__init__(norm.normalized_shape[0], eps=norm.eps)
        self.scale = norm.scale
        self.cpu_kernels = cpu_kernels.available("attention")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            self.cpu_kernels
            and not torch.compiler.is_compiling()
            and x.numel() <= _SMALL * x.shape[-1]
            and x.shape[-1] % 16 == 0  # the C loop's width
            and x.is_cpu
            and x.dtype == self.scale.dtype == torch.float32
        ):
            return cpu_kernels.rms_norm(x, self.scale, self.eps)
        return super().forward(x)


class FusedFeedForward(nn.Module):
    """torchtune's Llama feed-forward, ``down(silu(gate(x)) * up(x))``, with ``gate`` and
    ``up`` computed by one projection ``gate_up_proj`` (their weights stacked by rows)."""

    def __init__(self, gate_up_proj: nn.Module, down_proj: nn.Module, activation: nn.Module):
        super().__init__()
        self.gate_up_proj = gate_up_proj
        self.down_proj = down_proj
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.activation(gate) * up)


def _stacked(*linears: nn.Linear) -> nn.Linear:
    """One bias-free ``nn.Linear`` whose weight is the linears' weights stacked by rows."""
    weight = torch.cat([lin.weight for lin in linears])
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=False)
    return fused


def _plain(*modules) -> bool:
    return all(type(m) is nn.Linear and m.bias is None for m in modules)


@torch.no_grad()
def fuse_layers(model: nn.Module) -> int:
    """Replaces, in ``model.layers``, each torchtune ``MultiHeadAttention`` whose q, k and v
    projections are bias-free ``nn.Linear`` by a :class:`FusedAttention` and each
    ``FeedForward`` with bias-free gate, up and down projections by a
    :class:`FusedFeedForward` (still ``nn.Linear``: quantize them after), and torchtune's
    ``RMSNorm`` modules by :class:`DecodeRMSNorm`. Layers of any other kind (LoRA, q/k norms)
    are left as they are. Returns the number of attention and feed-forward modules replaced."""
    replaced = 0
    for layer in model.layers:
        attn, mlp = getattr(layer, "attn", None), getattr(layer, "mlp", None)
        if (
            type(attn) is MultiHeadAttention
            and attn.q_norm is None
            and _plain(attn.q_proj, attn.k_proj, attn.v_proj)
        ):
            layer.attn = FusedAttention(attn, _stacked(attn.q_proj, attn.k_proj, attn.v_proj))
            replaced += 1
        if type(mlp) is FeedForward and mlp.w3 is not None and _plain(mlp.w1, mlp.w2, mlp.w3):
            layer.mlp = FusedFeedForward(_stacked(mlp.w1, mlp.w3), mlp.w2, mlp.activation)
            replaced += 1
        for name in ("sa_norm", "mlp_norm"):
            if type(getattr(layer, name, None)) is RMSNorm:
                setattr(layer, name, DecodeRMSNorm(getattr(layer, name)))
    if type(getattr(model, "norm", None)) is RMSNorm:
        model.norm = DecodeRMSNorm(model.norm)
    return replaced

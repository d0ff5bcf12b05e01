"""The extended-vocabulary token embedding and output projection of the LoRA / QLoRA models.

The audio rows (ids from T on) are new and must train while the text rows stay frozen, so the
two parts are separate parameters, ``text_weight`` (frozen) and ``audio_weight`` (trainable), of
an ``AdapterModule``: torchtune's ``get_adapter_params`` picks the audio rows up with LoRA, and
the optimizer never sees the text rows. State-dict hooks keep torchtune's plain keys
(``tok_embeddings.weight``: text rows then audio rows; full tensors under FSDP2), so its HF
conversion and ``get_merged_lora_ckpt`` work unchanged. The forward never concatenates weights.
"""

import math
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torchtune.modules import TiedLinear

AUDIO_WEIGHT = "audio_weight"


def _full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full tensor (an all-gather), anything else as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _like(t: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``t`` placed as ``param`` is: sharded the same way when ``param`` is a DTensor."""
    if hasattr(param, "device_mesh") and not hasattr(t, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(t, param.device_mesh, param.placements)
    return t


class _TwoPartWeight(nn.Module):
    """Base of the modules below: ``text_weight`` [T, D] (frozen) and ``audio_weight`` [A, D],
    seen from outside as one ``weight`` [T + A, D] (state dict key ``weight``)."""

    def __init__(self, num_text_rows: int, num_audio_rows: int, dim: int):
        super().__init__()
        if num_text_rows < 1 or num_audio_rows < 1:
            raise ValueError(
                f"need text and audio rows, got {num_text_rows} text and {num_audio_rows} audio"
            )
        self.num_text_rows = num_text_rows
        self.num_audio_rows = num_audio_rows
        self.text_weight = nn.Parameter(torch.empty(num_text_rows, dim), requires_grad=False)
        self.audio_weight = nn.Parameter(torch.empty(num_audio_rows, dim))
        self.register_state_dict_post_hook(_merge_rows_hook)
        self.register_load_state_dict_pre_hook(_split_rows_hook)

    @property
    def weight(self) -> torch.Tensor:
        """Text rows then audio rows: a concatenated copy, for inspection and export (the
        forward never builds it)."""
        return torch.cat([self.text_weight, self.audio_weight])

    def adapter_params(self) -> List[str]:
        """The trainable audio rows, found by torchtune's ``get_adapter_params``."""
        return [AUDIO_WEIGHT]


def _merge_rows_hook(module: _TwoPartWeight, state_dict: Dict, prefix: str, local_metadata):
    """state_dict(): ``text_weight`` + ``audio_weight`` -> the plain ``weight`` key."""
    text = state_dict.pop(prefix + "text_weight")
    audio = state_dict.pop(prefix + AUDIO_WEIGHT)
    if text.device.type == "meta":  # shapes only (FSDP2 setup reads a meta state dict)
        state_dict[prefix + "weight"] = torch.empty(
            text.shape[0] + audio.shape[0], text.shape[1], dtype=text.dtype, device="meta"
        )
    else:
        state_dict[prefix + "weight"] = torch.cat([_full(text), _full(audio)]).detach()


def _split_rows_hook(
    module: _TwoPartWeight,
    state_dict: Dict,
    prefix: str,
    local_metadata,
    strict,
    missing_keys,
    unexpected_keys,
    error_msgs,
):
    """load_state_dict(): the plain ``weight`` key -> ``text_weight`` + ``audio_weight``."""
    key = prefix + "weight"
    if key not in state_dict:
        return  # native keys (or nothing for this module)
    weight = _full(state_dict.pop(key)).detach()
    rows = module.num_text_rows + module.num_audio_rows
    if weight.dim() != 2 or weight.shape[0] != rows:
        error_msgs.append(
            f"{key}: the checkpoint has shape {tuple(weight.shape)} but the model has "
            f"{module.num_text_rows} text + {module.num_audio_rows} audio rows = {rows}: "
            "check num_quantizers, text_vocab_size and pad_vocab_to_multiple_of"
        )
        return
    t = module.num_text_rows
    state_dict[prefix + "text_weight"] = _like(weight[:t], module.text_weight)
    state_dict[prefix + AUDIO_WEIGHT] = _like(weight[t:], module.audio_weight)


class ExtendedEmbedding(_TwoPartWeight):
    """Token embedding of the extended vocabulary: id ``i < T`` reads text row ``i`` (frozen),
    id ``i >= T`` reads audio row ``i - T`` (trainable). Same output as ``nn.Embedding`` over
    the concatenated weight.

    Args:
        num_text_rows (int): T, the text vocabulary size.
        num_audio_rows (int): rows from id T on: ``C * Q + 2`` plus any padding.
        embedding_dim (int): model width.
    """

    def __init__(self, num_text_rows: int, num_audio_rows: int, embedding_dim: int):
        super().__init__(num_text_rows, num_audio_rows, embedding_dim)
        self.num_embeddings = num_text_rows + num_audio_rows
        self.embedding_dim = embedding_dim
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.text_weight)  # as nn.Embedding
        nn.init.normal_(self.audio_weight)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = self.num_text_rows
        # two gathers with clamped ids, then select: each part only gets gradient where chosen
        text = F.embedding(tokens.clamp(max=t - 1), self.text_weight)
        audio = F.embedding((tokens - t).clamp(min=0), self.audio_weight)
        return torch.where((tokens < t).unsqueeze(-1), text, audio)


def _two_part_logits(x: torch.Tensor, text_weight, audio_weight) -> torch.Tensor:
    return torch.cat([F.linear(x, text_weight), F.linear(x, audio_weight)], dim=-1)


class ExtendedLinear(_TwoPartWeight):
    """Untied output projection of the extended vocabulary (Llama-Mimi-8B): logits of the text
    rows (frozen) and of the audio rows (trainable), optionally plus a LoRA update over the whole
    vocabulary (``apply_lora_to_output``; merged by ``get_merged_lora_ckpt`` into ``weight``).

    Args:
        in_dim (int): model width.
        num_text_rows (int): T.
        num_audio_rows (int): rows from id T on.
        lora_rank (Optional[int]): rank of a LoRA update on the output; None for none.
        lora_alpha (float): LoRA scaling numerator (scale = alpha / rank).
        lora_dropout (float): dropout on the LoRA path.
    """

    def __init__(
        self,
        in_dim: int,
        num_text_rows: int,
        num_audio_rows: int,
        lora_rank: Optional[int] = None,
        lora_alpha: float = 1.0,
        lora_dropout: float = 0.0,
    ):
        super().__init__(num_text_rows, num_audio_rows, in_dim)
        self.in_dim = in_dim
        self.out_dim = num_text_rows + num_audio_rows
        self.rank = lora_rank
        self.disabled = False  # torchtune's disable_adapter() turns off the LoRA part only
        if lora_rank:
            self.alpha = lora_alpha
            self.dropout = nn.Dropout(p=lora_dropout) if lora_dropout > 0 else nn.Identity()
            self.lora_a = nn.Linear(in_dim, lora_rank, bias=False)
            self.lora_b = nn.Linear(lora_rank, self.out_dim, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for w in (self.text_weight, self.audio_weight):  # as nn.Linear
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        if self.rank:
            self.initialize_parameters()

    def initialize_parameters(self) -> None:
        """LoRA init as torchtune's LoRALinear: A Kaiming-uniform, B zero."""
        nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b.weight)

    def adapter_params(self) -> List[str]:
        lora = ["lora_a.weight", "lora_b.weight"] if self.rank else []
        return [AUDIO_WEIGHT] + lora

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _two_part_logits(x, self.text_weight, self.audio_weight)
        if self.rank and not self.disabled:
            out = out + (self.alpha / self.rank) * self.lora_b(self.lora_a(self.dropout(x)))
        return out


class _TwoPartLinear(nn.Module):
    """The module the tied output calls (torchtune's activation offloading hooks ``.linear``)."""

    def forward(self, x, text_weight, audio_weight):
        return _two_part_logits(x, text_weight, audio_weight)


class TiedExtendedLinear(TiedLinear):
    """Output projection tied to an ``ExtendedEmbedding`` (Llama-Mimi-1.3B): logits against
    its text rows and its (trainable) audio rows. Like torchtune's ``TiedLinear`` it is not an
    ``nn.Module`` and holds no parameter of its own."""

    def __init__(self, tied_module: ExtendedEmbedding):
        if not isinstance(tied_module, ExtendedEmbedding):
            raise TypeError(f"expected an ExtendedEmbedding, got {type(tied_module).__name__}")
        self.tied_module = tied_module
        self.linear = _TwoPartLinear()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        emb = self.tied_module
        return self.linear(x, emb.text_weight, emb.audio_weight)


def audio_rows_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The trained audio rows of a model built with ``train_audio_rows=True``, under their
    native keys (``tok_embeddings.audio_weight``, and ``output.audio_weight`` when untied),
    detached on CPU. Empty for a model without them. ``LlamaMimiCheckpointer`` stores these in
    the adapter checkpoint; a recipe saving adapters only can add them to its adapter dict."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, _TwoPartWeight):
            key = f"{name}.{AUDIO_WEIGHT}" if name else AUDIO_WEIGHT
            out[key] = _full(module.audio_weight).detach().cpu()
    return out

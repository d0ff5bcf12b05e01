"""Llama-Mimi model builders: an unchanged Llama 3 decoder whose vocabulary is extended by the
Mimi audio ids (the released checkpoints' layout, vocab.py). Referenced from YAML as ``llama_mimi_tt.llama_mimi_1b``
and so on. The LoRA and QLoRA variants live beside these (``lora_llama_mimi_*``,
``qlora_llama_mimi_*``): torchtune's own LoRA builders, whose token embedding (and output
projection) keep the text rows frozen and train the audio rows (``llama_mimi_tt.modules``).

``python -m llama_mimi_tt.models`` prints parameter counts and weight bytes (meta device).
"""

from functools import partial
from typing import Dict, List, Optional

import torch
from torchao.dtypes.nf4tensor import NF4Tensor
from torchtune import training
from torchtune.models.llama3_1 import llama3_1, lora_llama3_1
from torchtune.models.llama3_2 import llama3_2, lora_llama3_2
from torchtune.modules import TiedLinear, TransformerDecoder
from torchtune.modules.peft import LORA_ATTN_MODULES, get_adapter_params

from llama_mimi_tt.modules import ExtendedEmbedding, ExtendedLinear, TiedExtendedLinear
from llama_mimi_tt.vocab import LLAMA3_TEXT_VOCAB_SIZE, MimiVocab

# The base models' shapes (torchtune's llama3_2_1b and llama3_1_8b) and a tiny one for tests
# and the CPU demo. seq_len 1024 is the paper's; RoPE allows far more.
SHAPES = {
    "1b": dict(num_layers=16, num_heads=32, num_kv_heads=8, embed_dim=2048, intermediate_dim=8192),
    "8b": dict(num_layers=32, num_heads=32, num_kv_heads=8, embed_dim=4096, intermediate_dim=14336),
    "tiny": dict(num_layers=4, num_heads=4, num_kv_heads=2, embed_dim=128, intermediate_dim=384),
}


def llama_mimi_vocab_size(
    num_quantizers: int, text_vocab_size: int, pad_vocab_to_multiple_of: int = 1
) -> int:
    """Rows of the extended embedding: T + C * Q + 2, optionally padded up."""
    vocab = MimiVocab(text_vocab_size=text_vocab_size, num_quantizers=num_quantizers)
    return vocab.padded_size(pad_vocab_to_multiple_of)


def llama_mimi_1b(
    num_quantizers: int = 4,
    text_vocab_size: int = LLAMA3_TEXT_VOCAB_SIZE,
    pad_vocab_to_multiple_of: int = 1,
    max_seq_len: int = 8192,
) -> TransformerDecoder:
    """Llama-Mimi-1.3B: Llama-3.2-1B (tied embeddings) with the Mimi vocabulary."""
    return llama3_2(
        vocab_size=llama_mimi_vocab_size(num_quantizers, text_vocab_size, pad_vocab_to_multiple_of),
        max_seq_len=max_seq_len,
        rope_base=500_000,
        norm_eps=1e-5,
        scale_factor=32,
        tie_word_embeddings=True,
        **SHAPES["1b"],
    )


def llama_mimi_8b(
    num_quantizers: int = 4,
    text_vocab_size: int = LLAMA3_TEXT_VOCAB_SIZE,
    pad_vocab_to_multiple_of: int = 1,
    max_seq_len: int = 8192,
) -> TransformerDecoder:
    """Llama-Mimi-8B: Llama-3.1-8B (untied output projection) with the Mimi vocabulary."""
    return llama3_1(
        vocab_size=llama_mimi_vocab_size(num_quantizers, text_vocab_size, pad_vocab_to_multiple_of),
        max_seq_len=max_seq_len,
        rope_base=500_000,
        norm_eps=1e-5,
        scale_factor=8,
        **SHAPES["8b"],
    )


def llama_mimi_tiny(
    num_quantizers: int = 4,
    text_vocab_size: int = 512,
    pad_vocab_to_multiple_of: int = 1,
    max_seq_len: int = 2048,
    tie_word_embeddings: bool = True,
) -> TransformerDecoder:
    """A 4-layer, 128-wide Llama 3.2-style model for tests and the CPU demo. Its default text
    vocabulary is the built-in byte tokenizer's (512 ids)."""
    return llama3_2(
        vocab_size=llama_mimi_vocab_size(num_quantizers, text_vocab_size, pad_vocab_to_multiple_of),
        max_seq_len=max_seq_len,
        rope_base=500_000,
        norm_eps=1e-5,
        scale_factor=32,
        tie_word_embeddings=tie_word_embeddings,
        **SHAPES["tiny"],
    )


# ------------------ LoRA and QLoRA ------------------


def _audio_rows_decoder(
    model: TransformerDecoder,
    *,
    text_vocab_size: int,
    vocab_size: int,
    embed_dim: int,
    tied: bool,
    lora_output: Optional[dict] = None,
) -> TransformerDecoder:
    """Puts the split text/audio embedding (and output projection) into a torchtune decoder."""
    audio_rows = vocab_size - text_vocab_size
    model.tok_embeddings = ExtendedEmbedding(text_vocab_size, audio_rows, embed_dim)
    if tied:
        model.output = TiedExtendedLinear(model.tok_embeddings)
    else:
        model.output = ExtendedLinear(embed_dim, text_vocab_size, audio_rows, **(lora_output or {}))
    return model


# torchao's NF4 quantizes blocks of 64 values with scales in blocks of 256: a weight needs a
# multiple of 64 * 256 elements
_NF4_MULTIPLE = 64 * 256


def _check_nf4_shapes(shape: dict) -> None:
    d, hd = shape["embed_dim"], shape["embed_dim"] // shape["num_heads"]
    sizes = {
        "k_proj/v_proj": d * shape["num_kv_heads"] * hd,
        "q_proj/output_proj": d * d,
        "mlp": d * shape["intermediate_dim"],
    }
    bad = {k: v for k, v in sizes.items() if v % _NF4_MULTIPLE}
    if bad:
        raise ValueError(
            f"QLoRA (quantize_base=True) needs every linear weight to have a multiple of "
            f"{_NF4_MULTIPLE} elements (torchao NF4 blocks); at this shape {bad} do not. Use the "
            "1b or 8b builders for QLoRA"
        )


def _lora_llama_mimi(
    component_builder,
    shape: dict,
    base_args: dict,
    tied: bool,
    *,
    lora_attn_modules: List[LORA_ATTN_MODULES],
    apply_lora_to_mlp: bool,
    apply_lora_to_output: bool,
    lora_rank: int,
    lora_alpha: float,
    lora_dropout: float,
    use_dora: bool,
    quantize_base: bool,
    num_quantizers: int,
    text_vocab_size: int,
    pad_vocab_to_multiple_of: int,
    max_seq_len: int,
    train_audio_rows: bool,
) -> TransformerDecoder:
    vocab_size = llama_mimi_vocab_size(num_quantizers, text_vocab_size, pad_vocab_to_multiple_of)
    if apply_lora_to_output and tied:
        raise ValueError(
            "apply_lora_to_output is not supported with tied embeddings (Llama-Mimi-1.3B), as in "
            "torchtune's lora_llama3_2: the output projection is the embedding"
        )
    if apply_lora_to_output and train_audio_rows and use_dora:
        raise ValueError(
            "DoRA on the output projection is not supported with train_audio_rows=True: "
            "set apply_lora_to_output=False (the audio rows of the output are trained in full)"
        )
    if quantize_base:
        _check_nf4_shapes(shape)
    lora_args = dict(
        lora_attn_modules=lora_attn_modules,
        apply_lora_to_mlp=apply_lora_to_mlp,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        use_dora=use_dora,
        quantize_base=quantize_base,
        max_seq_len=max_seq_len,
        **base_args,
        **shape,
    )
    if not train_audio_rows:  # torchtune's model as it is: embedding and output frozen
        return component_builder(
            vocab_size=vocab_size, apply_lora_to_output=apply_lora_to_output, **lora_args
        )
    # vocab_size=1: torchtune's own embedding/output are replaced right away, so never allocate
    # them at full size
    model = component_builder(vocab_size=1, apply_lora_to_output=False, **lora_args)
    lora_output = None
    if apply_lora_to_output:
        lora_output = dict(lora_rank=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout)
    return _audio_rows_decoder(
        model,
        text_vocab_size=text_vocab_size,
        vocab_size=vocab_size,
        embed_dim=shape["embed_dim"],
        tied=tied,
        lora_output=lora_output,
    )


_LLAMA3_2_ARGS = dict(rope_base=500_000, norm_eps=1e-5, scale_factor=32)
_LLAMA3_1_ARGS = dict(rope_base=500_000, norm_eps=1e-5, scale_factor=8)


def lora_llama_mimi_1b(
    lora_attn_modules: List[LORA_ATTN_MODULES],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: bool = False,
    num_quantizers: int = 4,
    text_vocab_size: int = LLAMA3_TEXT_VOCAB_SIZE,
    pad_vocab_to_multiple_of: int = 1,
    max_seq_len: int = 8192,
    train_audio_rows: bool = True,
) -> TransformerDecoder:
    """Llama-Mimi-1.3B with LoRA (torchtune's ``lora_llama3_2``, tied embeddings).

    Args:
        lora_attn_modules (List[LORA_ATTN_MODULES]): attention projections that get LoRA, any
            of ``q_proj``, ``k_proj``, ``v_proj``, ``output_proj``.
        apply_lora_to_mlp (bool): LoRA on the MLP projections too.
        apply_lora_to_output (bool): not supported for tied embeddings (as in torchtune).
        lora_rank (int): rank of each low-rank update.
        lora_alpha (float): scaling numerator (scale = alpha / rank).
        lora_dropout (float): dropout on the LoRA path.
        use_dora (bool): DoRA instead of LoRA.
        quantize_base (bool): NF4 base weights in the linear layers (QLoRA).
        num_quantizers (int): Q, Mimi levels per frame.
        text_vocab_size (int): T of the base model.
        pad_vocab_to_multiple_of (int): pad the vocabulary up to a multiple of this.
        max_seq_len (int): longest sequence (RoPE cache, KV cache).
        train_audio_rows (bool): the audio rows of the embedding (= the tied output) are
            trainable adapter parameters while the text rows stay frozen. False keeps the whole
            embedding frozen, for LoRA on an already-trained Llama-Mimi.
    """
    return _lora_llama_mimi(
        lora_llama3_2,
        SHAPES["1b"],
        dict(_LLAMA3_2_ARGS, tie_word_embeddings=True),
        True,
        lora_attn_modules=lora_attn_modules,
        apply_lora_to_mlp=apply_lora_to_mlp,
        apply_lora_to_output=apply_lora_to_output,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        use_dora=use_dora,
        quantize_base=quantize_base,
        num_quantizers=num_quantizers,
        text_vocab_size=text_vocab_size,
        pad_vocab_to_multiple_of=pad_vocab_to_multiple_of,
        max_seq_len=max_seq_len,
        train_audio_rows=train_audio_rows,
    )


def lora_llama_mimi_8b(
    lora_attn_modules: List[LORA_ATTN_MODULES],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: bool = False,
    num_quantizers: int = 4,
    text_vocab_size: int = LLAMA3_TEXT_VOCAB_SIZE,
    pad_vocab_to_multiple_of: int = 1,
    max_seq_len: int = 8192,
    train_audio_rows: bool = True,
) -> TransformerDecoder:
    """Llama-Mimi-8B with LoRA (torchtune's ``lora_llama3_1``, untied output projection).

    Arguments as ``lora_llama_mimi_1b``; here ``apply_lora_to_output`` is allowed (LoRA over the
    whole output projection, beside its trainable audio rows) and ``train_audio_rows`` makes the
    audio rows of both the embedding and the output projection trainable.
    """
    return _lora_llama_mimi(
        lora_llama3_1,
        SHAPES["8b"],
        _LLAMA3_1_ARGS,
        False,
        lora_attn_modules=lora_attn_modules,
        apply_lora_to_mlp=apply_lora_to_mlp,
        apply_lora_to_output=apply_lora_to_output,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        use_dora=use_dora,
        quantize_base=quantize_base,
        num_quantizers=num_quantizers,
        text_vocab_size=text_vocab_size,
        pad_vocab_to_multiple_of=pad_vocab_to_multiple_of,
        max_seq_len=max_seq_len,
        train_audio_rows=train_audio_rows,
    )


def lora_llama_mimi_tiny(
    lora_attn_modules: List[LORA_ATTN_MODULES],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: bool = False,
    num_quantizers: int = 4,
    text_vocab_size: int = 512,
    pad_vocab_to_multiple_of: int = 1,
    max_seq_len: int = 2048,
    train_audio_rows: bool = True,
    tie_word_embeddings: bool = True,
) -> TransformerDecoder:
    """``llama_mimi_tiny`` with LoRA, for tests and the CPU demo. Arguments as
    ``lora_llama_mimi_1b``; ``tie_word_embeddings=False`` gives the 8B's untied layout."""
    return _lora_llama_mimi(
        lora_llama3_2,
        SHAPES["tiny"],
        dict(_LLAMA3_2_ARGS, tie_word_embeddings=tie_word_embeddings),
        tie_word_embeddings,
        lora_attn_modules=lora_attn_modules,
        apply_lora_to_mlp=apply_lora_to_mlp,
        apply_lora_to_output=apply_lora_to_output,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        use_dora=use_dora,
        quantize_base=quantize_base,
        num_quantizers=num_quantizers,
        text_vocab_size=text_vocab_size,
        pad_vocab_to_multiple_of=pad_vocab_to_multiple_of,
        max_seq_len=max_seq_len,
        train_audio_rows=train_audio_rows,
    )


qlora_llama_mimi_1b = partial(lora_llama_mimi_1b, quantize_base=True)
qlora_llama_mimi_1b.__doc__ = """Llama-Mimi-1.3B with QLoRA: ``lora_llama_mimi_1b`` with the base
weights of every attention and MLP linear layer in NF4 (torchao). The embedding (with its
trainable audio rows) stays in the model dtype."""

qlora_llama_mimi_8b = partial(lora_llama_mimi_8b, quantize_base=True)
qlora_llama_mimi_8b.__doc__ = """Llama-Mimi-8B with QLoRA: ``lora_llama_mimi_8b`` with the base
weights of every attention and MLP linear layer in NF4 (torchao). The embedding and the output
projection (with their trainable audio rows) stay in the model dtype."""


# ------------------ sizes ------------------

# torchtune's own single-device LoRA/QLoRA configs for Llama 3.2 1B and Llama 3.1 8B
DEFAULT_LORA = {
    "1b": dict(
        lora_attn_modules=["q_proj", "v_proj", "output_proj"],
        apply_lora_to_mlp=True,
        lora_rank=64,
        lora_alpha=128,
    ),
    "8b": dict(
        lora_attn_modules=["q_proj", "v_proj", "output_proj"],
        apply_lora_to_mlp=True,
        lora_rank=8,
        lora_alpha=16,
    ),
}


def _tensor_bytes(t: torch.Tensor, dtype: torch.dtype) -> int:
    """Bytes of a weight stored in ``dtype``, or of an NF4 tensor's parts as stored (4-bit
    codes, int8 block scales, per-scaler-block factors, lookup table)."""
    if isinstance(t, NF4Tensor):
        names, _ = t.__tensor_flatten__()
        return sum(getattr(t, n).numel() * getattr(t, n).element_size() for n in names)
    return t.numel() * dtype.itemsize


def model_sizes(
    size: str = "1b",
    variant: str = "full",
    num_quantizers: int = 4,
    train_audio_rows: bool = True,
    **lora_args,
) -> Dict[str, int]:
    """Parameter count, trainable parameter count and bf16 weight bytes of a Llama-Mimi model,
    built on the meta device (no memory, no download).

    Args:
        size (str): ``"1b"`` or ``"8b"``.
        variant (str): ``"full"`` (every parameter trains), ``"lora"`` or ``"qlora"`` (adapter
            parameters train: the LoRA weights and, with ``train_audio_rows``, the audio rows).
        num_quantizers (int): Q.
        train_audio_rows (bool): passed to the LoRA builders.
        **lora_args: LoRA builder arguments; default: torchtune's single-device configs
            (``DEFAULT_LORA``).

    Returns:
        Dict[str, int]: ``params``, ``trainable``, ``weight_bytes`` (bf16, NF4 weights as
        stored), and ``audio_rows`` (parameters in the audio rows).
    """
    if variant not in ("full", "lora", "qlora"):
        raise ValueError(f"variant must be full, lora or qlora, got {variant!r}")
    with torch.device("meta"), training.set_default_dtype(torch.bfloat16):
        if variant == "full":
            model = {"1b": llama_mimi_1b, "8b": llama_mimi_8b}[size](num_quantizers)
            trainable = {n for n, _ in model.named_parameters()}
        else:
            builder = {"1b": lora_llama_mimi_1b, "8b": lora_llama_mimi_8b}[size]
            args = dict(DEFAULT_LORA[size], **lora_args)
            model = builder(
                **args,
                quantize_base=variant == "qlora",
                num_quantizers=num_quantizers,
                train_audio_rows=train_audio_rows,
            )
            trainable = set(get_adapter_params(model))
    params = dict(model.named_parameters())
    vocab = MimiVocab(num_quantizers=num_quantizers)
    dim = model.tok_embeddings.embedding_dim
    tied = isinstance(model.output, TiedLinear)
    return {
        "params": sum(p.numel() for p in params.values()),
        "trainable": sum(p.numel() for n, p in params.items() if n in trainable),
        "weight_bytes": sum(_tensor_bytes(p, torch.bfloat16) for p in params.values()),
        "audio_rows": (vocab.size - vocab.text_vocab_size) * dim * (1 if tied else 2),
    }


def size_table(num_quantizers: int = 4) -> str:
    """A markdown table of ``model_sizes`` for 1B and 8B, full / LoRA / QLoRA."""
    lines = [
        "| model | variant | params | trainable | of which audio rows | trainable % "
        "| weight bytes (bf16; NF4 as stored) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for size in ("1b", "8b"):
        for variant in ("full", "lora", "qlora"):
            s = model_sizes(size, variant, num_quantizers)
            lines.append(
                f"| Llama-Mimi-{size.upper()} | {variant} | {s['params']:,} | {s['trainable']:,} "
                f"| {s['audio_rows']:,} | {100 * s['trainable'] / s['params']:.2f} "
                f"| {s['weight_bytes']:,} ({s['weight_bytes'] / 2**30:.2f} GiB) |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    print(
        "Llama-Mimi at Q=4, counted on the meta device. LoRA / QLoRA as torchtune's single-device"
    )
    print("configs: attention q_proj, v_proj, output_proj + MLP; 1B rank 64 alpha 128, 8B rank 8")
    print(
        "alpha 16; audio rows trainable (train_audio_rows=True). QLoRA: attention and MLP weights"
    )
    print("in torchao NF4 (4-bit codes + int8 block scales per 64 + bf16 factors per 256 blocks).")
    print()
    print(size_table())

"""Llama-Mimi model builders: an unchanged Llama 3 decoder whose vocabulary is extended by the
Mimi audio ids (DESIGN.md, contract 1). Referenced from YAML as ``llama_mimi_tt.llama_mimi_1b``
and so on. The LoRA and QLoRA variants live beside these (``lora_llama_mimi_*``).
"""

from torchtune.models.llama3_1._component_builders import llama3_1
from torchtune.models.llama3_2._component_builders import llama3_2
from torchtune.modules import TransformerDecoder

from llama_mimi_tt.vocab import LLAMA3_TEXT_VOCAB_SIZE, MimiVocab

# The base models' shapes (torchtune's llama3_2_1b and llama3_1_8b) and a tiny one for tests
# and the CPU demo. seq_len 1024 is the paper's; RoPE allows far more.
SHAPES = {
    "1b": dict(
        num_layers=16, num_heads=32, num_kv_heads=8, embed_dim=2048, intermediate_dim=8192
    ),
    "8b": dict(
        num_layers=32, num_heads=32, num_kv_heads=8, embed_dim=4096, intermediate_dim=14336
    ),
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

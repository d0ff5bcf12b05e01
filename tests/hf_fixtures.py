"""Tiny random Llama checkpoints in Hugging Face format, written by transformers, for tests.

``make_tiny_hf_llama`` writes what a user downloads: a base Llama 3.2-like model (text vocabulary
only) or, with ``extended_num_quantizers``, a Llama-Mimi-like one (vocabulary already extended,
config.json ``num_quantizers``, tokenizer with the audio tokens). Shapes match
``llama_mimi_tiny``; RoPE is scaled as Llama 3.2 (llama3, factor 32) so torchtune's
``Llama3ScaledRoPE`` computes the same thing as transformers.
"""

import json
import shutil
from pathlib import Path
from typing import List, Optional

import torch
from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

from llama_mimi_tt.hf_export import BOS, EOS, bytes_to_unicode, llama3_special_tokens
from llama_mimi_tt.models import SHAPES
from llama_mimi_tt.tokenizer import byte_tokenizer_path
from llama_mimi_tt.vocab import MimiVocab

TINY_TEXT_VOCAB_SIZE = 512


def tiny_llama_config(vocab_size: int, tie: bool = True, **extra):
    """A transformers ``LlamaConfig`` of ``llama_mimi_tiny``'s shape, Llama 3.2-style."""
    from transformers import LlamaConfig

    s = SHAPES["tiny"]
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=s["embed_dim"],
        intermediate_size=s["intermediate_dim"],
        num_hidden_layers=s["num_layers"],
        num_attention_heads=s["num_heads"],
        num_key_value_heads=s["num_kv_heads"],
        head_dim=s["embed_dim"] // s["num_heads"],
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling={
            "factor": 32.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=tie,
        bos_token_id=TINY_TEXT_VOCAB_SIZE - 256,
        eos_token_id=TINY_TEXT_VOCAB_SIZE - 255,
        torch_dtype="float32",
        **extra,
    )


def special_tokens(text_vocab_size: int) -> List[str]:
    """Llama 3's special tokens (HF names), more reserved ones if T is larger than 512."""
    names = llama3_special_tokens()
    extra = text_vocab_size - 256 - len(names)
    return names + [f"<|reserved_special_token_{248 + i}|>" for i in range(extra)]


def byte_level_hf_tokenizer(
    text_vocab_size: int = TINY_TEXT_VOCAB_SIZE, num_quantizers: Optional[int] = None
) -> Tokenizer:
    """A byte-level ``tokenizers`` BPE (id i = byte i, as the built-in tiktoken file) with Llama
    3's special tokens after the bytes, BOS prepended as in the HF Llama 3 tokenizer, and the
    audio tokens added when ``num_quantizers`` is set."""
    vocab = {ch: b for b, ch in bytes_to_unicode().items()}
    tok = Tokenizer(BPE(vocab=vocab, merges=[], ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [AddedToken(t, normalized=False, special=True) for t in special_tokens(text_vocab_size)]
    )
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    if num_quantizers:
        strings = MimiVocab(text_vocab_size, num_quantizers).token_strings()
        tok.add_tokens([AddedToken(s, normalized=False) for s in strings])
    return tok


def make_tiny_hf_llama(
    directory,
    text_vocab_size: int = TINY_TEXT_VOCAB_SIZE,
    tie: bool = True,
    extended_num_quantizers: Optional[int] = None,
    tokenizer: str = "both",
    seed: int = 0,
) -> Path:
    """Writes a random tiny Llama (transformers ``save_pretrained``, safetensors) and returns
    its directory.

    Args:
        directory: where to write (created).
        text_vocab_size (int): T.
        tie (bool): tied input/output embeddings (Llama 3.2) or not (Llama 3.1).
        extended_num_quantizers (Optional[int]): write a Llama-Mimi-like checkpoint for this Q:
            vocab_size T + 2048 * Q + 2, config.json ``num_quantizers``, tokenizer with the
            audio tokens.
        tokenizer (str): ``"json"`` (tokenizer.json + tokenizer_config.json), ``"tiktoken"``
            (original/tokenizer.model only, as Meta's download), ``"both"`` or ``"none"``.
        seed (int): weights seed.
    """
    from transformers import LlamaForCausalLM

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    extra = {}
    vocab_size = text_vocab_size
    if extended_num_quantizers:
        vocab = MimiVocab(text_vocab_size, extended_num_quantizers)
        vocab_size = vocab.size
        extra = dict(num_quantizers=extended_num_quantizers, text_vocab_size=text_vocab_size)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size, tie, **extra)).float().eval()
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer in ("json", "both"):
        byte_level_hf_tokenizer(text_vocab_size, extended_num_quantizers).save(
            str(out / "tokenizer.json")
        )
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS,
            "eos_token": EOS,
            "model_input_names": ["input_ids", "attention_mask"],
        }
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    if tokenizer in ("tiktoken", "both"):
        if text_vocab_size != TINY_TEXT_VOCAB_SIZE:
            raise ValueError("the byte-level tiktoken file has T=512")
        (out / "original").mkdir(exist_ok=True)
        shutil.copy(byte_tokenizer_path(), out / "original" / "tokenizer.model")
    return out


def hf_logits(directory, ids: torch.Tensor) -> torch.Tensor:
    """fp32 logits of ``AutoModelForCausalLM.from_pretrained(directory)``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits

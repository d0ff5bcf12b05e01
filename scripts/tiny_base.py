"""A random tiny "base Llama 3" checkpoint in Hugging Face format, for the CPU demo.

``python scripts/tiny_base.py OUT_DIR`` writes what the real journey starts from (config.json,
model.safetensors, original/tokenizer.model) at the shape of ``llama_mimi_tiny`` with the
built-in byte tokenizer's 512 text ids, so ``llama_mimi_full`` adds the audio rows to it exactly
as it does to Llama-3.2-1B. The weights are random (seeded): the demo's model learns only from
the demo clips.
"""

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torchtune.models.convert_weights import tune_to_hf
from torchtune.models.llama3_2 import llama3_2

from llama_mimi_tt.models import SHAPES
from llama_mimi_tt.tokenizer import byte_tokenizer_path

TINY_TEXT_VOCAB_SIZE = 512


def hf_llama_config(shape: dict, vocab_size: int, tie: bool = True, max_seq_len: int = 131072):
    """config.json of a Llama 3.2-style model (RoPE scaled as Llama 3.2: factor 32)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": shape["embed_dim"],
        "intermediate_size": shape["intermediate_dim"],
        "num_hidden_layers": shape["num_layers"],
        "num_attention_heads": shape["num_heads"],
        "num_key_value_heads": shape["num_kv_heads"],
        "head_dim": shape["embed_dim"] // shape["num_heads"],
        "max_position_embeddings": max_seq_len,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "factor": 32.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": tie,
        "bos_token_id": TINY_TEXT_VOCAB_SIZE - 256,
        "eos_token_id": TINY_TEXT_VOCAB_SIZE - 255,
        "torch_dtype": "float32",
    }


def tied_hf_state_dict(state_dict: dict, shape: dict) -> dict:
    """torchtune -> Hugging Face keys for a tied-embedding model (the output is the embedding)."""
    sd = {k: v for k, v in state_dict.items() if not k.startswith("output.")}
    return tune_to_hf(
        sd, num_heads=shape["num_heads"], num_kv_heads=shape["num_kv_heads"], dim=shape["embed_dim"]
    )


def write_tiny_base_llama(out_dir: str, seed: int = 0) -> Path:
    """Writes the random tiny base Llama 3 checkpoint; returns its directory."""
    out = Path(out_dir)
    (out / "original").mkdir(parents=True, exist_ok=True)
    shape = SHAPES["tiny"]
    torch.manual_seed(seed)
    model = llama3_2(vocab_size=TINY_TEXT_VOCAB_SIZE, max_seq_len=2048, scale_factor=32, **shape)
    for p in model.parameters():  # Llama-like init scale, independent of torchtune's defaults
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.02)
    hf = tied_hf_state_dict(model.state_dict(), shape)
    save_file({k: v.contiguous() for k, v in hf.items()}, out / "model.safetensors")
    config = hf_llama_config(shape, TINY_TEXT_VOCAB_SIZE)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    shutil.copy(byte_tokenizer_path(), out / "original" / "tokenizer.model")
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"wrote a random tiny base Llama 3 to {write_tiny_base_llama(args.out_dir, args.seed)}")

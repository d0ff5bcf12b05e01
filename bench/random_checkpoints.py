"""Random inputs of the real shapes, for the rehearsals (bench/rehearsal.py on CPU,
bench/gpu_rehearsal.py on a GPU): nothing is downloaded.

- ``write_base(dir, "1b" | "8b")``: a random Llama 3 base in Hugging Face format (config.json,
  bf16 safetensors shards + ``model.safetensors.index.json``, a ``tokenizer.json`` of the real
  size, T = 128256);
- ``write_random_codes(dir, n, ...)``: a finished code cache of ``n`` random utterances;
- ``RandomWeightsCheckpointer``: a checkpointer that hands the recipe random weights made on its
  device (``checkpointer._component_=random_checkpoints.RandomWeightsCheckpointer``).
"""

import json
import random
import sys
from pathlib import Path

import torch
from torchtune import training

from llama_mimi_tt.checkpointer import LlamaMimiCheckpointer

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))  # scripts.tiny_base

T = 128256


def write_tokenizer_json(out_dir: Path) -> None:
    """A byte-level BPE of 128000 entries (random merges) + Llama 3's 256 special tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE

    from llama_mimi_tt.hf_export import bytes_to_unicode
    from llama_mimi_tt.tokenizer import llama3_special_tokens

    tokens = list(bytes_to_unicode().values())
    vocab = {t: i for i, t in enumerate(tokens)}
    merges, rng = [], random.Random(0)
    while len(tokens) < T - 256:
        pool = min(len(tokens), 4096)
        a, b = tokens[rng.randrange(pool)], tokens[rng.randrange(pool)]
        if a + b in vocab:
            continue
        vocab[a + b] = len(tokens)
        tokens.append(a + b)
        merges.append((a, b))
    tok = Tokenizer(BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [AddedToken(t, normalized=False, special=True) for t in llama3_special_tokens()]
    )
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    assert tok.get_vocab_size() == T and tok.token_to_id(bos) == 128000
    tok.save(str(out_dir / "tokenizer.json"))
    config = {"bos_token": bos, "eos_token": "<|end_of_text|>", "model_max_length": 131072}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config))


def write_base(out_dir: Path, size: str, num_shards: int = 3, weights: bool = True) -> None:
    """A random Llama 3 base of ``size``'s shape in HF format (bf16 shards + index)."""
    from safetensors.torch import save_file

    from llama_mimi_tt.models import SHAPES
    from scripts.tiny_base import hf_llama_config

    s = SHAPES[size]
    tie = size == "1b"
    out_dir.mkdir(parents=True, exist_ok=True)
    config = hf_llama_config(s, T, tie=tie)
    config.update(bos_token_id=128000, eos_token_id=128001, torch_dtype="bfloat16")
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    write_tokenizer_json(out_dir)
    if not weights:
        return
    d, kv = s["embed_dim"], s["num_kv_heads"] * s["embed_dim"] // s["num_heads"]
    shapes = {"model.embed_tokens.weight": (T, d), "model.norm.weight": (d,)}
    for i in range(s["num_layers"]):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (d, d),
                p + "self_attn.k_proj.weight": (kv, d),
                p + "self_attn.v_proj.weight": (kv, d),
                p + "self_attn.o_proj.weight": (d, d),
                p + "mlp.gate_proj.weight": (s["intermediate_dim"], d),
                p + "mlp.up_proj.weight": (s["intermediate_dim"], d),
                p + "mlp.down_proj.weight": (d, s["intermediate_dim"]),
                p + "input_layernorm.weight": (d,),
                p + "post_attention_layernorm.weight": (d,),
            }
        )
    if not tie:
        shapes["lm_head.weight"] = (T, d)
    gen = torch.Generator().manual_seed(0)
    keys, weight_map, total = list(shapes), {}, 0
    per = -(-len(keys) // num_shards)
    for n in range(num_shards):
        name = f"model-{n + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {}
        for k in keys[n * per : (n + 1) * per]:
            shape = shapes[k]
            t = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=gen) * 0.02
            part[k] = t.to(torch.bfloat16)
            total += part[k].numel() * 2
        save_file(part, out_dir / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
        del part
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_random_codes(
    out_dir: Path, num_utterances: int, num_quantizers: int, frames=(40, 40), seed: int = 0
) -> Path:
    """A code cache (``write_code_cache``) of random utterances of ``frames[0]..frames[1]``
    frames each."""
    import numpy as np

    from llama_mimi_tt.code_cache import write_code_cache

    g = np.random.default_rng(seed)
    utts = [
        {
            "id": f"utt{i:05d}",
            "codes": g.integers(
                0, 2048, (num_quantizers, int(g.integers(frames[0], frames[1] + 1)))
            ).astype(np.uint16),
        }
        for i in range(num_utterances)
    ]
    shard_size = max(200, -(-num_utterances // 4))
    return write_code_cache(out_dir, utts, num_quantizers=num_quantizers, shard_size=shard_size)


class RandomWeightsCheckpointer(LlamaMimiCheckpointer):
    """``LlamaMimiCheckpointer`` whose ``load_checkpoint`` gives random weights of the model's
    own shapes, made on the model's device: the recipe's setup (model, NF4 wrapping, compile,
    loading into the model) without a 16 GB folder to write and read (config.json and the
    tokenizer are still read from ``checkpoint_dir``)."""

    def check_model(self, model):
        super().check_model(model)
        # the children's state dicts: the model's own QLoRA hook would dequantize every weight
        self.shapes, self.device = {}, next(model.parameters()).device
        for name, child in model.named_children():
            for k, v in child.state_dict(prefix=f"{name}.").items():
                if "lora_" not in k:
                    self.shapes[k] = tuple(v.shape)

    def load_checkpoint(self):
        g = torch.Generator(self.device).manual_seed(0)
        sd = {}
        for k, shape in self.shapes.items():
            if len(shape) == 1:
                sd[k] = torch.ones(shape, device=self.device, dtype=torch.bfloat16)
            else:
                t = torch.randn(shape, generator=g, device=self.device, dtype=torch.bfloat16)
                sd[k] = t.mul_(0.02)
        return {training.MODEL_KEY: sd}

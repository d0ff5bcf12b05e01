"""fused_layers: the decoder with q/k/v and gate/up fused and our decode attention computes what
torchtune's layers compute (logits of a whole sequence, left-padded batched decoding, compiled
decoding), takes the decode attention at every one-token step, and leaves other layers alone.
Each runs with our kernels on (skipped on a CPU without AVX-512) and off
(LLAMA_MIMI_CPU_KERNELS=0: the fused layers' PyTorch route, which runs everywhere)."""

import copy

import pytest
import torch

from llama_mimi_tt import cpu_kernels, fused_layers
from llama_mimi_tt.fused_layers import FusedAttention, FusedFeedForward, fuse_layers
from llama_mimi_tt.generation import SamplingParams, generate
from llama_mimi_tt.models import llama_mimi_tiny, lora_llama_mimi_tiny
from llama_mimi_tt.vocab import MimiVocab

Q = 4
VOCAB = MimiVocab(text_vocab_size=512, num_quantizers=Q)
GREEDY = SamplingParams(temperature=0.0, top_k=None)


def prompt(frames: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, VOCAB.codebook_size, (Q, frames), generator=g)
    return torch.cat([torch.tensor([256, VOCAB.audio_start_id]), VOCAB.encode(codes)])


@pytest.fixture(scope="module", params=["kernels on", "kernels off"])
def models(request):
    """``(torchtune's, fused)``: the tiny model (4 layers, 4 query and 2 key/value heads) with
    N(0, 0.1) weights, so that its greedy continuations are not a constant; the fused layers
    built with our kernels on or off (they decide when built)."""
    on = request.param == "kernels on"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLAMA_MIMI_CPU_KERNELS", "1" if on else "0")
        if on and not cpu_kernels.available("attention"):
            pytest.skip("this CPU cannot run the decode attention")
        torch.manual_seed(0)
        plain = llama_mimi_tiny(num_quantizers=Q).eval()
        with torch.no_grad():
            for p in plain.parameters():
                if p.dim() > 1:
                    p.normal_(0.0, 0.1)
        fused = copy.deepcopy(plain)
        assert fuse_layers(fused) == 8  # the attention and the feed-forward of each of 4 layers
    assert fused.layers[0].attn.cpu_kernels == on and fused.norm.cpu_kernels == on
    return plain, fused


def test_fused_layers_stack_the_projections(models):
    plain, fused = models
    attn, mlp = fused.layers[0].attn, fused.layers[0].mlp
    assert isinstance(attn, FusedAttention) and isinstance(mlp, FusedFeedForward)
    assert not hasattr(attn, "q_proj") and attn.qkv_proj.weight.shape == (128 + 2 * 64, 128)
    ref = plain.layers[0]
    assert torch.equal(attn.qkv_proj.weight[128:192], ref.attn.k_proj.weight)
    assert torch.equal(mlp.gate_up_proj.weight[384:], ref.mlp.w3.weight)
    assert mlp.down_proj is fused.layers[0].mlp.down_proj and attn.kv_cache is None


def test_logits_equal_torchtunes(models):
    plain, fused = models
    ids = prompt(30, seed=1)[None]
    with torch.no_grad():
        torch.testing.assert_close(fused(ids), plain(ids), rtol=1e-5, atol=1e-5)


def test_batched_decoding_equals_torchtunes(models, monkeypatch):
    plain, fused = models
    calls = []
    attention = cpu_kernels.decode_attention
    monkeypatch.setattr(
        fused_layers.cpu_kernels,
        "decode_attention",
        lambda *args: calls.append(args[1].shape) or attention(*args),
    )
    prompts = [prompt(3, seed=2), prompt(7, seed=3)]  # different lengths: left padding
    kw = dict(semantic=GREEDY, acoustic=GREEDY, stop_at_end=False)
    ours = generate(fused, prompts, VOCAB, 6, **kw)
    ref = generate(plain, prompts, VOCAB, 6, **kw)
    assert all(torch.equal(a, b) for a, b in zip(ours.ids, ref.ids))
    assert len(set(ours.ids[1][-24:].tolist())) > 4  # a real continuation, not a constant
    on = fused.layers[0].attn.cpu_kernels  # every layer of every step after the prompt's:
    assert len(calls) == (4 * (24 - 1) if on else 0)
    # a sampled continuation too: the same Gumbel draws on logits equal to about 1e-6
    kw = dict(semantic=SamplingParams(1.0, 50), acoustic=SamplingParams(1.0, 50), seed=[7, 8])
    a = generate(fused, prompts, VOCAB, 6, stop_at_end=False, **kw)
    b = generate(plain, prompts, VOCAB, 6, stop_at_end=False, **kw)
    assert all(torch.equal(x, y) for x, y in zip(a.ids, b.ids))


def test_compiled_decoding_equals_eager(models):
    _, fused = models
    prompts = [prompt(3, seed=2), prompt(7, seed=3)]
    kw = dict(semantic=GREEDY, acoustic=GREEDY, stop_at_end=False)
    torch.compiler.reset()
    compiled = generate(fused, prompts, VOCAB, 4, compile=True, **kw)
    eager = generate(fused, prompts, VOCAB, 4, **kw)
    assert all(torch.equal(x, y) for x, y in zip(compiled.ids, eager.ids))


def test_other_layers_are_left_alone():
    lora = lora_llama_mimi_tiny(["q_proj", "v_proj"], num_quantizers=Q)
    assert fuse_layers(lora) == 4  # the feed-forwards only: LoRA attention is not fused
    assert all(type(layer.attn).__name__ == "MultiHeadAttention" for layer in lora.layers)
    model = llama_mimi_tiny(num_quantizers=Q)
    fuse_layers(model)
    with pytest.raises(ValueError, match="self-attention only"):
        model.layers[0].attn(torch.zeros(1, 2, 128), torch.zeros(1, 3, 128))

"""LlamaMimiLoss: torchtune's chunked cross-entropy plus the semantic / acoustic level losses of
the same per-token losses, returned (not stored); and torchtune's compile_loss compiles the part
that does the work."""

import torch
import torch.nn.functional as F
from torch._dynamo import register_backend
from torchtune import training
from torchtune.modules.loss import CEWithChunkedOutputLoss

from llama_mimi_tt import LlamaMimiLoss, MimiVocab

VOCAB = MimiVocab(text_vocab_size=512, num_quantizers=4)


def batch(seed=0, n=2, length=40):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(VOCAB.audio_offset, VOCAB.audio_start_id, (n, length), generator=g)
    labels[:, :3] = torch.tensor([256, 10, VOCAB.audio_start_id])  # <bos>, text, <audio>
    labels[0, -5:] = -100  # padding
    logits = torch.randn(n, length, VOCAB.size, generator=g)
    return logits, labels


def test_loss_and_level_losses_equal_a_direct_computation():
    logits, labels = batch()
    loss_fn = LlamaMimiLoss(num_quantizers=4, text_vocab_size=512, num_output_chunks=4)
    loss, stats = loss_fn.loss_and_level_stats(list(logits.chunk(4, dim=1)), labels)
    per_token = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
    flat = labels.flatten()
    audio = (flat >= 512) & (flat < VOCAB.audio_start_id)
    semantic = audio & ((flat - 512) % 4 == 0)
    acoustic = audio & ~semantic
    torch.testing.assert_close(loss, per_token.sum() / (flat != -100).sum())
    expected = [
        per_token[semantic].sum(),
        semantic.sum(),
        per_token[acoustic].sum(),
        acoustic.sum(),
    ]
    torch.testing.assert_close(stats, torch.stack(expected).float())
    assert not stats.requires_grad and loss.requires_grad is False  # plain tensors in, no grad


def test_forward_is_torchtunes_loss_for_stock_recipes():
    """torchtune's recipes call ``loss_fn(logits, labels)`` and multiply the result by a token
    count: chunked (as CEWithChunkedOutputLoss) or, unchunked, flattened to [N, V] and [N]."""
    logits, labels = batch(seed=2)
    ours = LlamaMimiLoss(num_quantizers=4, text_vocab_size=512, num_output_chunks=4)
    stock = CEWithChunkedOutputLoss(num_output_chunks=4)
    chunks = list(logits.chunk(4, dim=1))
    want = stock(chunks, labels)
    got = ours(chunks, labels)
    assert isinstance(got, torch.Tensor) and got.shape == ()
    torch.testing.assert_close(got, want)
    flat = ours(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    torch.testing.assert_close(flat, want)
    assert 6.0 < want.item() < 12.0  # random logits: about ln(V) + 0.5 = 9.6


def test_compile_loss_compiles_the_level_aware_cross_entropy(monkeypatch):
    calls = []

    @register_backend(name="llama_mimi_counting")
    def counting(gm, example_inputs):  # a torch.compile backend: counts graphs, runs them eagerly
        calls.append(gm)
        return gm.forward

    monkeypatch.setenv("TORCH_COMPILE_BACKEND", "llama_mimi_counting")
    logits, labels = batch(seed=1)
    eager = LlamaMimiLoss(num_quantizers=4, text_vocab_size=512, num_output_chunks=4)
    compiled = training.compile_loss(
        LlamaMimiLoss(num_quantizers=4, text_vocab_size=512, num_output_chunks=4)
    )
    chunks = list(logits.chunk(4, dim=1))
    want = eager.loss_and_level_stats(chunks, labels)
    got = compiled.loss_and_level_stats(chunks, labels)
    assert calls, "the compiled loss never ran through torch.compile"
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])

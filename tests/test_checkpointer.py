"""LlamaMimiCheckpointer against transformers, on tiny random checkpoints written by the tests.

Base Llama 3.2-like checkpoint in: text logits equal to transformers'; saved out: transformers
loads model and tokenizer with the same logits and ids. The same for a Llama-Mimi-like
checkpoint, and a mismatched one is refused. Figures are printed (pytest -s).
"""

import base64
import json
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file

from llama_mimi_tt import LlamaMimiCheckpointer, LlamaMimiTokenizer, MimiVocab, llama_mimi_tiny
from llama_mimi_tt.checkpointer import init_audio_rows
from llama_mimi_tt.hf_export import LLAMA3_PATTERN, tiktoken_to_hf
from tests.hf_fixtures import hf_logits, make_tiny_hf_llama
from tests.reference_tokenizer import reference_string

T, Q = 512, 4
VOCAB = MimiVocab(text_vocab_size=T, num_quantizers=Q)
TOL = 1e-4


def checkpointer(src, out, **kwargs):
    kwargs.setdefault("num_quantizers", Q)
    kwargs.setdefault("text_vocab_size", T)
    return LlamaMimiCheckpointer(
        checkpoint_dir=str(src),
        checkpoint_files=["model.safetensors"],
        model_type="LLAMA3_2",
        output_dir=str(out),
        **kwargs,
    )


def load_tiny(src, out, tie=True, **kwargs):
    ckpt = checkpointer(src, out, **kwargs)
    sd = ckpt.load_checkpoint()
    model = llama_mimi_tiny(Q, T, tie_word_embeddings=tie).eval()
    model.load_state_dict(sd["model"])
    return ckpt, model


def mixed_ids(seed=0, frames=6):
    """<|begin_of_text|> text <audio> frames </audio>, batch of 2."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(2):
        text = torch.randint(0, 256, (5,), generator=g)
        codes = torch.randint(0, 2048, (Q, frames), generator=g)
        audio = VOCAB.encode(codes)
        rows.append(
            torch.cat(
                [
                    torch.tensor([256]),
                    text,
                    torch.tensor([VOCAB.audio_start_id]),
                    audio,
                    torch.tensor([VOCAB.audio_end_id]),
                ]
            )
        )
    return torch.stack(rows)


def max_diff(model, directory, ids):
    with torch.no_grad():
        ours = model(ids)
    ref = hf_logits(directory, ids)
    return (ours[..., : ref.shape[-1]] - ref).abs().max().item()


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return make_tiny_hf_llama(tmp_path_factory.mktemp("base"), tie=True)


@pytest.mark.parametrize("tie", [True, False])
def test_base_checkpoint_text_logits_and_hf_roundtrip(tmp_path, tie):
    src = make_tiny_hf_llama(tmp_path / "base", tie=tie, seed=1)
    ckpt, model = load_tiny(src, tmp_path / "out", tie=tie)

    # (a) text-only inputs: the extension does not change text behaviour
    text = torch.randint(0, T, (2, 24), generator=torch.Generator().manual_seed(0))
    d = max_diff(model, src, text)
    print(f"\n[tie={tie}] base in, text-only logits vs transformers: max abs diff {d:.2e}")
    assert d <= TOL

    # (b) save, reload in transformers: same logits on mixed text/audio sequences
    with torch.no_grad():  # make every weight (audio rows included) differ from the input
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    ckpt.save_checkpoint({"model": model.state_dict()}, epoch=0)
    out = tmp_path / "out" / "epoch_0"
    d = max_diff(model, out, mixed_ids())
    print(f"[tie={tie}] saved, mixed text/audio logits vs transformers: max abs diff {d:.2e}")
    assert d <= TOL
    config = json.loads((out / "config.json").read_text())
    assert (config["vocab_size"], config["num_quantizers"]) == (VOCAB.size, Q)
    assert config["tie_word_embeddings"] == tie
    shards = [p.name for p in out.glob("*.safetensors")]
    assert shards == ["model-00001-of-00001.safetensors"]
    assert ("lm_head.weight" in load_file(out / shards[0])) == (not tie)


def test_audio_rows_init_is_deterministic_and_follows_text_statistics(base_dir, tmp_path):
    a = checkpointer(base_dir, tmp_path / "a").load_checkpoint()["model"]["tok_embeddings.weight"]
    b = checkpointer(base_dir, tmp_path / "b").load_checkpoint()["model"]["tok_embeddings.weight"]
    assert a.shape == (VOCAB.size, 128) and torch.equal(a, b)
    text, audio = a[:T], a[T:]
    torch.testing.assert_close(audio, init_audio_rows(text, VOCAB.size - T))
    assert (audio.mean(0) - text.mean(0)).abs().max() < 0.1 * text.std(0).mean() + 1e-3
    assert (audio.std(0) / text.std(0) - 1).abs().mean() < 0.05
    other = checkpointer(base_dir, tmp_path / "c", audio_init_seed=1).load_checkpoint()
    assert not torch.equal(other["model"]["tok_embeddings.weight"][T:], audio)


@pytest.mark.parametrize("tokenizer", ["json", "tiktoken"])
def test_saved_tokenizer_maps_audio_tokens_to_our_ids(tmp_path, tokenizer):
    from transformers import AutoTokenizer

    src = make_tiny_hf_llama(tmp_path / "base", tokenizer=tokenizer)
    ckpt, model = load_tiny(src, tmp_path / "out")
    ckpt.save_checkpoint({"model": model.state_dict()}, epoch=0)
    tok = AutoTokenizer.from_pretrained(tmp_path / "out" / "epoch_0")
    assert len(tok) == VOCAB.size
    codes = torch.randint(0, 2048, (Q, 50), generator=torch.Generator().manual_seed(3))
    ids = tok(reference_string(codes), add_special_tokens=False).input_ids
    assert ids == [VOCAB.audio_start_id, *VOCAB.encode(codes).tolist(), VOCAB.audio_end_id]
    assert tok.convert_ids_to_tokens([T + 5 * Q + 3]) == ["<5_3>"]
    # text ids unchanged: as our (torchtune) tokenizer, BOS first as in the HF Llama 3
    ours = LlamaMimiTokenizer("builtin:byte", num_quantizers=Q)
    text = "Hello, world! 123 héllo"
    assert tok(text).input_ids == ours.encode(text, add_bos=True)
    assert tok.bos_token_id == ours.bos_id and tok.eos_token_id == ours.eos_id


def test_llama_mimi_checkpoint_loads_as_is(tmp_path):
    from transformers import AutoTokenizer

    src = make_tiny_hf_llama(tmp_path / "mimi", extended_num_quantizers=Q, tie=True, seed=2)
    src_rows = load_file(src / "model.safetensors")["model.embed_tokens.weight"]
    ckpt, model = load_tiny(src, tmp_path / "out")
    assert torch.equal(model.tok_embeddings.weight, src_rows)  # as it is, no new rows
    d = max_diff(model, src, mixed_ids(1))
    print(f"\nLlama-Mimi-like in, mixed logits vs transformers: max abs diff {d:.2e}")
    assert d <= TOL
    ckpt.save_checkpoint({"model": model.state_dict()}, epoch=0)
    out = tmp_path / "out" / "epoch_0"
    d = max_diff(model, out, mixed_ids(2))
    print(f"Llama-Mimi-like saved, mixed logits vs transformers: max abs diff {d:.2e}")
    assert d <= TOL
    tok = AutoTokenizer.from_pretrained(out)
    codes = torch.randint(0, 2048, (Q, 20), generator=torch.Generator().manual_seed(4))
    ids = tok(reference_string(codes), add_special_tokens=False).input_ids
    assert ids == [VOCAB.audio_start_id, *VOCAB.encode(codes).tolist(), VOCAB.audio_end_id]


def test_padded_vocabulary_roundtrip(tmp_path):
    src = make_tiny_hf_llama(tmp_path / "base", seed=3)
    ckpt = checkpointer(src, tmp_path / "out", pad_vocab_to_multiple_of=64)
    sd = ckpt.load_checkpoint()
    model = llama_mimi_tiny(Q, T, pad_vocab_to_multiple_of=64).eval()
    model.load_state_dict(sd["model"])
    assert model.tok_embeddings.num_embeddings == VOCAB.padded_size(64) > VOCAB.size
    ckpt.save_checkpoint({"model": model.state_dict()}, epoch=0)
    assert max_diff(model, tmp_path / "out" / "epoch_0", mixed_ids(3)) <= TOL


def test_mismatched_checkpoints_are_refused(tmp_path):
    # config.json says Q=8
    q8 = make_tiny_hf_llama(tmp_path / "q8", extended_num_quantizers=8, tokenizer="json")
    with pytest.raises(ValueError, match=r"num_quantizers=8 but the config says num_quantizers=4"):
        checkpointer(q8, tmp_path / "o1")
    # no num_quantizers in config.json: told by the vocabulary size
    cfg = json.loads((q8 / "config.json").read_text())
    del cfg["num_quantizers"], cfg["text_vocab_size"]
    (q8 / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"8706|T \+ C \* Q \+ 2 for num_quantizers=8"):
        checkpointer(q8, tmp_path / "o2").load_checkpoint()
    # a vocabulary that is neither T nor T + C * Q + 2
    odd = make_tiny_hf_llama(tmp_path / "odd", text_vocab_size=600, tokenizer="json")
    with pytest.raises(ValueError, match=r"600 rows; neither the text vocabulary T=512"):
        checkpointer(odd, tmp_path / "o3").load_checkpoint()
    # the tokenizer of a Q=8 checkpoint cannot be saved as Q=4
    q8tok = make_tiny_hf_llama(tmp_path / "q8tok", extended_num_quantizers=8, tokenizer="json")
    cfg = json.loads((q8tok / "config.json").read_text())
    del cfg["num_quantizers"]
    (q8tok / "config.json").write_text(json.dumps(cfg))
    ckpt = checkpointer(q8tok, tmp_path / "o4", tokenizer_path=str(q8tok))
    with pytest.raises(ValueError, match=r"audio tokens for num_quantizers=8"):
        ckpt.write_hf_files(tmp_path / "o4" / "x")
    # no tokenizer at all: the weights load (no tokenizer is needed for that); saving, which
    # writes the extended tokenizer, says which file is missing
    bare = make_tiny_hf_llama(tmp_path / "bare", tokenizer="none")
    ckpt = checkpointer(bare, tmp_path / "o5")
    assert ckpt.load_checkpoint()["model"]["tok_embeddings.weight"].shape[0] == ckpt.vocab_size
    with pytest.raises(FileNotFoundError, match="original/tokenizer.model"):
        ckpt.write_hf_files(tmp_path / "o5" / "x")


def _toy_tiktoken_ranks(text: str, num_merges: int = 300):
    """A small byte-level BPE trained on ``text`` (Llama 3 pre-tokenization), as tiktoken ranks."""
    import regex

    ranks = {bytes([b]): b for b in range(256)}
    words = Counter(
        tuple(bytes([b]) for b in w.encode()) for w in regex.findall(LLAMA3_PATTERN, text)
    )
    for _ in range(num_merges):
        pairs = Counter()
        for w, n in words.items():
            for a, b in zip(w, w[1:]):
                pairs[a, b] += n
        if not pairs:
            break
        (a, b), _ = pairs.most_common(1)[0]
        ranks.setdefault(a + b, len(ranks))
        new = Counter()
        for w, n in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == (a, b):
                    out.append(a + b)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new[tuple(out)] += n
        words = new
    return ranks


def test_tiktoken_conversion_gives_tiktokens_ids(tmp_path):
    import tiktoken

    corpus = (
        "The quick brown fox jumps over the lazy dog. Speech language models predict audio "
        "tokens frame by frame; Llama-Mimi flattens the Mimi codes. It's 2025, isn't it? "
    ) * 20 + "naïve café déjà vu 12345 6789\n\n  indented\tline"
    ranks = _toy_tiktoken_ranks(corpus)
    assert len(ranks) > 350  # whole words of the corpus are single tokens by now
    path = tmp_path / "toy.tiktoken"
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    enc = tiktoken.Encoding(
        name="toy", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens={}
    )
    hf = tiktoken_to_hf(str(path))
    assert hf.get_vocab_size(with_added_tokens=True) == len(ranks) + 256
    assert hf.token_to_id("<|begin_of_text|>") == len(ranks)
    assert hf.token_to_id("<|eot_id|>") == len(ranks) + 9
    samples = [
        corpus[:300],
        "the lazy fox's models don't predict 1234567 frames!!\n\n\nok",
        "Unseen wörds: speechless, quickly-browned; 日本語 テキスト 🙂",
        "   leading spaces and trailing   ",
    ]
    for s in samples:
        assert hf.encode(s, add_special_tokens=False).ids == enc.encode(s), s
        assert hf.decode(enc.encode(s)) == s
    assert hf.encode("hi").ids[0] == len(ranks)  # BOS prepended

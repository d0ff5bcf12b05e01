import json

import pytest
import torch
from tokenizers import Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE
from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

from llama_mimi_tt import LlamaMimiTokenizer, MimiVocab, llama_mimi_tokenizer
from llama_mimi_tt.tokenizer import byte_tokenizer_path


def write_hf_byte_tokenizer(d, with_audio_q=None):
    """A byte-level tokenizer.json (256 byte tokens, then Llama 3's 256 special tokens)."""
    byte_vocab = {ch: b for b, ch in bytes_to_unicode().items()}  # id i is byte i, as tiktoken
    tok = Tokenizer(BPE(vocab=byte_vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>"]
    specials += ["<|reserved_special_token_1|>", "<|finetune_right_pad_id|>"]
    specials += [f"<|reserved_special_token_{i}|>" for i in range(2, 253)]
    tok.add_special_tokens(specials)
    if with_audio_q:
        tok.add_tokens(MimiVocab(512, with_audio_q).token_strings())
    d.mkdir(parents=True, exist_ok=True)
    tok.save(str(d / "tokenizer.json"))
    cfg = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


def test_builtin_byte_tokenizer_layout():
    tok = llama_mimi_tokenizer("builtin:byte", num_quantizers=4)
    assert tok.vocab == MimiVocab(text_vocab_size=512, num_quantizers=4)
    assert (tok.bos_id, tok.eos_id) == (256, 257)
    assert tok.encode("hi") == [256, ord("h"), ord("i")]
    assert tok.decode(tok.encode("hello world")) == "hello world"


def test_a2a_and_tts_sequences():
    tok = LlamaMimiTokenizer("builtin:byte", num_quantizers=4)
    codes = torch.randint(0, 2048, (4, 6))
    v = tok.vocab
    ids, start = tok.tokenize(codes)
    assert start == 1
    assert ids == [tok.bos_id, v.audio_start_id, *v.encode(codes).tolist(), v.audio_end_id]
    assert tok.header_ids() == ids[:2] == [256, 512 + 2048 * 4]  # what packing continues with
    assert tok.prompt_ids(codes).tolist() == ids[:-1]  # a generation prompt: audio left open
    ids, start = tok.tokenize(codes, text="Hi!")
    assert ids[:start] == [tok.bos_id, ord("H"), ord("i"), ord("!")]
    assert ids[start] == v.audio_start_id and ids[-1] == v.audio_end_id
    text, audio = tok.split(ids)
    assert text == "Hi!" and torch.equal(audio[0], codes)
    sample = tok({"codes": codes, "text": "Hi!"})
    assert sample["mask"] == [True] * 4 + [False] * (len(ids) - 4)
    # a Q=8 cache used at Q=4 keeps the first 4 levels
    ids8, _ = tok.tokenize(torch.cat([codes, codes]))
    assert ids8 == tok.tokenize(codes)[0]


def test_max_seq_len_cuts_on_frame_boundaries():
    tok = LlamaMimiTokenizer("builtin:byte", num_quantizers=4, max_seq_len=16)
    ids, start = tok.tokenize(torch.randint(0, 2048, (4, 10)))
    # bos + <audio> + 3 whole frames (12) = 14 <= 16; no </audio> as the utterance goes on
    assert len(ids) == 14 and (len(ids) - start - 1) % 4 == 0
    tiny = LlamaMimiTokenizer("builtin:byte", num_quantizers=4, max_seq_len=5)
    with pytest.raises(ValueError, match="max_seq_len=5 leaves no room for one frame"):
        tiny.tokenize(torch.zeros(4, 3, dtype=torch.long), text="long prompt")


def test_hf_tokenizer_json_matches_tiktoken_route(tmp_path):
    d = write_hf_byte_tokenizer(tmp_path / "hf")
    hf = LlamaMimiTokenizer(str(d), num_quantizers=4)
    tt = LlamaMimiTokenizer(byte_tokenizer_path(), num_quantizers=4)
    assert hf.vocab == tt.vocab
    codes = torch.randint(0, 2048, (4, 5))
    assert hf.tokenize(codes, "abc")[0] == tt.tokenize(codes, "abc")[0]
    # a released Llama-Mimi tokenizer.json already holds the audio tokens: T is where they start
    ext = LlamaMimiTokenizer(str(write_hf_byte_tokenizer(tmp_path / "ext", 4)), num_quantizers=4)
    assert ext.vocab.text_vocab_size == 512


def test_bad_tokenizer_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model does not exist"):
        LlamaMimiTokenizer(str(tmp_path / "nope.model"))
    with pytest.raises(FileNotFoundError, match="no tokenizer in"):
        LlamaMimiTokenizer(str(tmp_path))
    with pytest.raises(ValueError, match="text_vocab_size=128256 in the config, but"):
        LlamaMimiTokenizer("builtin:byte", text_vocab_size=128256)
    tok = LlamaMimiTokenizer("builtin:byte", num_quantizers=8)
    with pytest.raises(ValueError, match="codes have 4 levels but .* num_quantizers=8"):
        tok.tokenize(torch.zeros(4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="empty text"):
        tok.tokenize(torch.zeros(8, 2, dtype=torch.long), text="  ")
    (tmp_path / "lonely").mkdir()
    (tmp_path / "lonely" / "tokenizer.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="needs tokenizer_config.json"):
        LlamaMimiTokenizer(str(tmp_path / "lonely" / "tokenizer.json"))

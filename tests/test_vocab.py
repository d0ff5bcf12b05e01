import numpy as np
import pytest
import torch

from llama_mimi_tt import MimiVocab
from tests.reference_tokenizer import reference_string, reference_tokenizer


@pytest.mark.parametrize("q", [1, 4, 8])
def test_ids_match_reference_hf_tokenizer(q):
    t = 128256
    tok = reference_tokenizer(t, q)
    vocab = MimiVocab(text_vocab_size=t, num_quantizers=q)
    g = torch.Generator().manual_seed(q)
    codes = torch.randint(0, 2048, (q, 50), generator=g)
    codes[:, 0] = 0  # the corners of the layout
    codes[:, 1] = 2047
    ref = tok.encode(reference_string(codes)).ids
    ours = [vocab.audio_start_id, *vocab.encode(codes).tolist(), vocab.audio_end_id]
    assert ours == ref
    assert vocab.size == len(tok.get_vocab()) == t + 2048 * q + 2
    assert tok.token_to_id("<audio>") == vocab.audio_start_id
    assert tok.token_to_id("</audio>") == vocab.audio_end_id


def test_layout_numbers():
    v = MimiVocab()  # Llama 3, Q = 4
    assert (v.audio_start_id, v.audio_end_id, v.size) == (136448, 136449, 136450)
    assert v.encode(torch.tensor([[5], [6], [7], [8]])).tolist() == [
        128256 + 5 * 4 + 0,
        128256 + 6 * 4 + 1,
        128256 + 7 * 4 + 2,
        128256 + 8 * 4 + 3,
    ]
    assert v.padded_size(64) == 136512
    assert range(*v.level_ids(2))[:2] == range(128258, 128266, 4)


def test_code_ids_per_level_and_back():
    v = MimiVocab(text_vocab_size=512, num_quantizers=4)
    codes = torch.tensor([0, 1, 2047])
    assert v.code_ids(codes, 3).tolist() == [515, 519, 512 + 2047 * 4 + 3]
    assert v.code_ids(7, 1) == 541
    assert v.codes_of(v.code_ids(codes, 2)).tolist() == [0, 1, 2047]
    assert v.level_of(v.code_ids(codes, 2)).tolist() == [2, 2, 2]


def test_num_quantizers_of_a_vocabulary_size():
    v = MimiVocab()  # T = 128256, C = 2048
    assert v.num_quantizers_of(136450) == 4
    assert v.num_quantizers_of(128256 + 2048 * 8 + 2) == 8
    assert v.num_quantizers_of(128256) is None  # a base Llama 3: no audio rows
    assert v.num_quantizers_of(136451) is None  # not T + C * Q + 2


def test_encode_decode_roundtrip_batched_and_numpy():
    v = MimiVocab(text_vocab_size=512, num_quantizers=8)
    codes = torch.randint(0, 2048, (3, 2, 8, 17))
    ids = v.encode(codes)
    assert ids.shape == (3, 2, 17 * 8)
    assert torch.equal(v.decode(ids), codes)
    np_codes = codes.numpy().astype(np.uint16)
    np_ids = v.encode(np_codes)
    assert isinstance(np_ids, np.ndarray)
    assert np.array_equal(v.decode(np_ids), codes.numpy())
    # frame-major: frame 0 levels 0..7, then frame 1
    assert v.level_of(ids[0, 0, :9]).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 0]


def test_decode_names_first_bad_position():
    v = MimiVocab(num_quantizers=4)
    ids = v.encode(torch.randint(0, 2048, (4, 5)))
    swapped = ids.clone()
    swapped[[5, 6]] = swapped[[6, 5]]
    with pytest.raises(ValueError, match=r"position \(5,\) is level 2, expected level 1"):
        v.decode(swapped)
    with pytest.raises(ValueError, match="not a whole number of frames"):
        v.decode(ids[:-1])
    text = ids.clone()
    text[9] = 42
    with pytest.raises(ValueError, match=r"id 42 at position \(9,\) is not an audio-code id"):
        v.decode(text)
    marker = ids.clone()
    marker[0] = v.audio_start_id
    with pytest.raises(ValueError, match="position \\(0,\\)"):
        v.decode(marker)


def test_encode_rejects_bad_codes():
    v = MimiVocab(num_quantizers=4)
    codes = torch.zeros(4, 3, dtype=torch.long)
    codes[2, 1] = 2048
    with pytest.raises(ValueError, match=r"code 2048 at \[level 2, frame 1\] is outside"):
        v.encode(codes)
    codes[2, 1] = -1
    with pytest.raises(ValueError, match="outside the codebook range"):
        v.encode(codes)
    with pytest.raises(ValueError, match=r"shape \[..., Q=4, frames\]"):
        v.encode(torch.zeros(3, 5, dtype=torch.long))
    for q in (0, 33):
        with pytest.raises(ValueError, match="num_quantizers must be in 1..32"):
            MimiVocab(num_quantizers=q)


def test_audio_spans_and_split():
    v = MimiVocab(text_vocab_size=512, num_quantizers=2)
    a = torch.randint(0, 2048, (2, 3))
    b = torch.randint(0, 2048, (2, 2))
    seq = torch.cat(
        [
            torch.tensor([256, 72, 105, v.audio_start_id]),
            v.encode(a),
            torch.tensor([v.audio_end_id, 33, v.audio_start_id]),
            v.encode(b),
            v.encode(torch.tensor([[1], [2]]))[:1],  # a partial frame: generation cut mid-frame
        ]
    )
    spans = v.audio_spans(seq)
    assert spans == [(4, 10), (13, len(seq))]
    text, audio = v.split(seq)
    assert text == [256, 72, 105, 33]
    assert torch.equal(audio[0], a) and torch.equal(audio[1], b)

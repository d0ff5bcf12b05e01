"""Speaker embeddings from a tiny random WavLM x-vector model saved locally, and their cosine."""

import numpy as np
import pytest
import torch

from llama_mimi_tt.errors import MissingFileError
from llama_mimi_tt.speaker_similarity import SpeakerEmbedder, cosine_similarity


def test_cosine_similarity():
    def cos(a, b):
        return cosine_similarity(torch.tensor(a), torch.tensor(b))

    assert cos([1.0, 0.0], [3.0, 0.0]) == pytest.approx(1.0)  # the length does not count
    assert cos([1.0, 0.0], [0.0, 2.0]) == pytest.approx(0.0)
    assert cos([1.0, 1.0], [-1.0, 0.0]) == pytest.approx(-(0.5**0.5))
    assert cos([[1.0], [2.0]], [2.0, 4.0]) == pytest.approx(1.0)  # flattened


def test_speaker_embedder_from_a_local_wavlm_xvector(tmp_path):
    transformers = pytest.importorskip("transformers")

    cfg = transformers.WavLMConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        conv_dim=(32, 32), conv_stride=(5, 4), conv_kernel=(10, 8), num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2, tdnn_dim=(32, 32), tdnn_kernel=(3, 1),
        tdnn_dilation=(1, 1), xvector_output_dim=16, num_buckets=16, max_bucket_distance=64,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.WavLMForXVector(cfg).save_pretrained(tmp_path / "spk")
    transformers.Wav2Vec2FeatureExtractor(sampling_rate=16000).save_pretrained(tmp_path / "spk")
    embed = SpeakerEmbedder(str(tmp_path / "spk"))
    rng = np.random.default_rng(0)
    a = torch.from_numpy(rng.standard_normal(24000).astype(np.float32) * 0.1)
    b = torch.from_numpy(rng.standard_normal(24000).astype(np.float32) * 0.1)
    ea, eb = embed(a, 24000), embed(b, 24000)  # resampled to the model's 16 kHz
    assert ea.shape == (16,)
    assert cosine_similarity(ea, embed(a, 24000)) == pytest.approx(1.0)
    assert -1.0 <= cosine_similarity(ea, eb) < 1.0
    with pytest.raises(MissingFileError, match="speaker model directory"):
        SpeakerEmbedder(str(tmp_path / "missing"))

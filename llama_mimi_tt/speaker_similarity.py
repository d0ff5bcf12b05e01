"""Speaker similarity of a continuation to its prompt: the cosine similarity of two speaker
embeddings.

``SpeakerEmbedder`` (the YAML component, ``_component_:
llama_mimi_tt.speaker_similarity.SpeakerEmbedder``) loads a transformers audio x-vector model
from a local directory. Any other speaker model plugs in the same way: a callable
``embed(wave, sample_rate)`` that returns a 1-D tensor. Nothing is downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from llama_mimi_tt.audio import prepare_waveform
from llama_mimi_tt.errors import MissingFileError

__all__ = ["SpeakerEmbedder", "cosine_similarity"]


class SpeakerEmbedder:
    """Speaker embeddings from a transformers audio x-vector model in a local directory
    (``WavLMForXVector``, ``Wav2Vec2ForXVector``, ... via ``AutoModelForAudioXVector``).

    Args:
        model: the model directory (saved with ``save_pretrained``), e.g. a local copy of
            microsoft/wavlm-base-plus-sv.
        device: where the model runs.
    """

    def __init__(self, model: str, device: str = "cpu"):
        try:
            from transformers import AutoFeatureExtractor, AutoModelForAudioXVector
        except ImportError as e:
            raise ImportError(
                "speaker similarity needs transformers: `pip install 'llama-mimi-tt[eval]'`"
            ) from e
        path = Path(os.path.expanduser(model))
        if not path.is_dir():
            raise MissingFileError(
                f"speaker model directory {path} not found: give a local directory with an "
                "audio x-vector model (e.g. microsoft/wavlm-base-plus-sv saved with save_pretrained)"
            )
        self.extractor = AutoFeatureExtractor.from_pretrained(str(path), local_files_only=True)
        self.model = AutoModelForAudioXVector.from_pretrained(str(path), local_files_only=True)
        self.model.eval().to(device)
        self.device = device
        self.sample_rate = self.extractor.sampling_rate

    @torch.no_grad()
    def __call__(self, wave: torch.Tensor, sample_rate: int) -> torch.Tensor:
        audio = prepare_waveform(wave, sample_rate, self.sample_rate).numpy()
        inputs = self.extractor(audio, sampling_rate=self.sample_rate, return_tensors="pt")
        out = self.model(**{k: v.to(self.device) for k, v in inputs.items()})
        return out.embeddings[0].float().cpu()


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two 1-D embeddings."""
    a, b = torch.as_tensor(a).flatten().double(), torch.as_tensor(b).flatten().double()
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))

"""Speech recognition for evaluation: transcripts of prompts and continuations, which the LLM
judge, GenPPL and Auto-BLEU score.

``build_asr`` is the YAML component (``_component_: llama_mimi_tt.asr.build_asr``): openai-whisper
from a local ``.pt`` checkpoint (``WhisperASR``) or a transformers pipeline from a local model
directory (``TransformersASR``). Either is a callable ``asr(wave, sample_rate) -> str``. Nothing
is downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

from llama_mimi_tt.audio import prepare_waveform
from llama_mimi_tt.errors import MissingFileError

__all__ = ["TransformersASR", "WhisperASR", "build_asr"]


class WhisperASR:
    """openai-whisper from a local checkpoint file (``.pt``, as whisper downloads them).

    Args:
        model: path of the checkpoint file (e.g. ``~/.cache/whisper/large-v3.pt``).
        device: ``"cpu"`` or ``"cuda"``.
        language: the spoken language (``"en"``), or None to detect it.
    """

    sample_rate = 16000

    def __init__(self, model: str, device: str = "cpu", language: Optional[str] = "en"):
        try:
            import whisper
        except ImportError as e:
            raise ImportError(
                "asr.kind=whisper needs openai-whisper: `pip install 'llama-mimi-tt[eval]'` (or use "
                "asr.kind=transformers with a local Whisper model directory)"
            ) from e
        path = Path(os.path.expanduser(model))
        if not path.is_file():
            raise MissingFileError(
                f"Whisper checkpoint {path} not found: give the path of a local .pt file (whisper "
                "saves them under ~/.cache/whisper when it downloads one)"
            )
        self.model = whisper.load_model(str(path), device=device)
        self.language = language
        self.fp16 = device != "cpu"

    def __call__(self, wave: torch.Tensor, sample_rate: int) -> str:
        audio = prepare_waveform(wave, sample_rate, self.sample_rate).numpy()
        out = self.model.transcribe(audio, language=self.language, fp16=self.fp16)
        return out["text"].strip()


class TransformersASR:
    """A transformers ``automatic-speech-recognition`` pipeline from a local model directory
    (Whisper, wav2vec 2.0, ... saved with ``save_pretrained``).

    Args:
        model: the model directory.
        device: ``"cpu"``, ``"cuda"`` ...
        language: for Whisper models, the spoken language (``"english"``); None otherwise.
    """

    def __init__(self, model: str, device: str = "cpu", language: Optional[str] = None):
        try:
            from transformers import pipeline
        except ImportError as e:
            raise ImportError(
                "asr.kind=transformers needs transformers: `pip install 'llama-mimi-tt[eval]'`"
            ) from e
        path = Path(os.path.expanduser(model))
        if not path.is_dir():
            raise MissingFileError(
                f"ASR model directory {path} not found: give a local directory saved with "
                "save_pretrained (config.json, weights, processor files)"
            )
        self.pipe = pipeline("automatic-speech-recognition", model=str(path), device=device)
        self.sample_rate = self.pipe.feature_extractor.sampling_rate
        self.language = language

    def __call__(self, wave: torch.Tensor, sample_rate: int) -> str:
        audio = prepare_waveform(wave, sample_rate, self.sample_rate).numpy()
        kwargs = {"generate_kwargs": {"language": self.language}} if self.language else {}
        out = self.pipe({"raw": audio, "sampling_rate": self.sample_rate}, **kwargs)
        return out["text"].strip()


def build_asr(kind: str, model: str, device: str = "cpu", language: Optional[str] = None):
    """The ASR component for YAML: ``kind`` is ``whisper`` (openai-whisper, ``model`` a local
    ``.pt`` file) or ``transformers`` (a pipeline, ``model`` a local directory). Either returns a
    callable ``asr(wave, sample_rate) -> str``."""
    if kind == "whisper":
        return WhisperASR(model, device=device, language=language or "en")
    if kind == "transformers":
        return TransformersASR(model, device=device, language=language)
    raise ValueError(f"asr kind must be 'whisper' or 'transformers', got {kind!r}")

"""The ASR builder: each kind names what it needs when its model or package is missing."""

import pytest

from llama_mimi_tt.asr import build_asr
from llama_mimi_tt.errors import MissingFileError


def test_asr_builders_fail_clearly(tmp_path):
    with pytest.raises((ImportError, MissingFileError), match="whisper|Whisper"):
        build_asr("whisper", str(tmp_path / "large-v3.pt"))
    with pytest.raises(MissingFileError, match="ASR model directory"):
        build_asr("transformers", str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="'whisper' or 'transformers'"):
        build_asr("kaldi", "x")

"""llama-mimi-tt: Llama-Mimi speech language models as a torchtune plugin.

The small Python API (DESIGN.md, contract 4) and the components YAML configs reference
(``_component_: llama_mimi_tt.<name>``).
"""

from llama_mimi_tt.audio import load_audio, prepare_waveform, save_audio, synthetic_audio
from llama_mimi_tt.checkpointer import LlamaMimiCheckpointer
from llama_mimi_tt.code_cache import mimi_codec, open_audio_source
from llama_mimi_tt.codec import MimiCodec, MimiStreamingDecoder, num_frames
from llama_mimi_tt.data import (
    AudioPackedDataset,
    AudioTokenDataset,
    AudioTokenIterableDataset,
    audio_token_dataset,
)
from llama_mimi_tt.evaluation import (
    SUITES,
    LayoutError,
    Pair,
    encode_audio_files,
    format_table,
    read_suite,
    score_pairs,
    score_sequences,
    summarize,
)
from llama_mimi_tt.generation import GenerationOutput, SamplingParams, generate
from llama_mimi_tt.judge import ChatJudge, SpeakerEmbedder, build_asr, evaluate_generations, mean_ci
from llama_mimi_tt.loss import LlamaMimiLoss
from llama_mimi_tt.models import (
    llama_mimi_1b,
    llama_mimi_8b,
    llama_mimi_tiny,
    lora_llama_mimi_1b,
    lora_llama_mimi_8b,
    lora_llama_mimi_tiny,
    model_sizes,
    qlora_llama_mimi_1b,
    qlora_llama_mimi_8b,
)
from llama_mimi_tt.modules import audio_rows_state_dict
from llama_mimi_tt.preference import PreferenceDataset, preference_dataset
from llama_mimi_tt.tokenizer import LlamaMimiTokenizer, llama_mimi_tokenizer
from llama_mimi_tt.vocab import MimiVocab

__all__ = [
    # token layout, tokenizer, codec (contract 4)
    "MimiVocab",
    "LlamaMimiTokenizer",
    "llama_mimi_tokenizer",
    "MimiCodec",
    "MimiStreamingDecoder",
    "mimi_codec",
    "num_frames",
    "load_audio",
    "prepare_waveform",
    "save_audio",
    "synthetic_audio",
    # models and checkpoints
    "llama_mimi_1b",
    "llama_mimi_8b",
    "llama_mimi_tiny",
    "lora_llama_mimi_1b",
    "lora_llama_mimi_8b",
    "lora_llama_mimi_tiny",
    "qlora_llama_mimi_1b",
    "qlora_llama_mimi_8b",
    "model_sizes",
    "audio_rows_state_dict",
    "LlamaMimiCheckpointer",
    # data and training
    "open_audio_source",
    "audio_token_dataset",
    "preference_dataset",
    "PreferenceDataset",
    "AudioTokenDataset",
    "AudioPackedDataset",
    "AudioTokenIterableDataset",
    "LlamaMimiLoss",
    # generation
    "generate",
    "SamplingParams",
    "GenerationOutput",
    # evaluation
    "SUITES",
    "LayoutError",
    "Pair",
    "read_suite",
    "encode_audio_files",
    "score_sequences",
    "score_pairs",
    "summarize",
    "format_table",
    "ChatJudge",
    "SpeakerEmbedder",
    "build_asr",
    "evaluate_generations",
    "mean_ci",
]

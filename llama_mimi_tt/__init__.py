"""llama-mimi-tt: Llama-Mimi speech language models as a torchtune plugin.

The small Python API for notebooks and scripts, and the components YAML configs reference
(``_component_: llama_mimi_tt.<name>``). Names are imported on first use (PEP 562), so
``import llama_mimi_tt.vocab`` does not pull in the codec, the datasets library or the judges.
"""

import importlib

# public name -> the module that owns it
_OWNERS = {
    # token layout, tokenizer, codec
    "MimiVocab": "vocab",
    "LlamaMimiTokenizer": "tokenizer",
    "llama_mimi_tokenizer": "tokenizer",
    "MimiCodec": "codec",
    "MimiStreamingDecoder": "codec",
    "mimi_codec": "codec",
    "num_frames": "codec",
    "load_audio": "audio",
    "prepare_waveform": "audio",
    "save_audio": "audio",
    "synthetic_audio": "audio",
    # models and checkpoints
    "llama_mimi_1b": "models",
    "llama_mimi_8b": "models",
    "llama_mimi_tiny": "models",
    "lora_llama_mimi_1b": "models",
    "lora_llama_mimi_8b": "models",
    "lora_llama_mimi_tiny": "models",
    "qlora_llama_mimi_1b": "models",
    "qlora_llama_mimi_8b": "models",
    "model_sizes": "models",
    "audio_rows_state_dict": "modules",
    "LlamaMimiCheckpointer": "checkpointer",
    "load_model": "loading",
    # data and training
    "open_audio_source": "audio_sources",
    "audio_token_dataset": "data",
    "preference_dataset": "preference",
    "PreferenceDataset": "preference",
    "AudioTokenDataset": "data",
    "AudioPackedDataset": "data",
    "AudioTokenIterableDataset": "data",
    "LlamaMimiLoss": "loss",
    # generation
    "generate": "generation",
    "SamplingParams": "generation",
    "GenerationOutput": "generation",
    # evaluation
    "SUITES": "benchmarks",
    "LayoutError": "benchmarks",
    "Pair": "benchmarks",
    "read_suite": "benchmarks",
    "encode_audio_files": "evaluation",
    "score_sequences": "evaluation",
    "score_pairs": "evaluation",
    "summarize": "evaluation",
    "format_table": "evaluation",
    "ChatJudge": "judge",
    "evaluate_generations": "judge",
    "build_asr": "asr",
    "SpeakerEmbedder": "speaker_similarity",
    "mean_ci": "statistics",
}

__all__ = list(_OWNERS)


def __getattr__(name):
    if name not in _OWNERS:
        raise AttributeError(f"module 'llama_mimi_tt' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"llama_mimi_tt.{_OWNERS[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)

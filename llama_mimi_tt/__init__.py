"""llama-mimi-tt: Llama-Mimi speech language models as a torchtune plugin.

The small public API (DESIGN.md, contract 4) and the components that YAML configs reference.
"""

from llama_mimi_tt.models import llama_mimi_1b, llama_mimi_8b, llama_mimi_tiny
from llama_mimi_tt.tokenizer import LlamaMimiTokenizer, llama_mimi_tokenizer
from llama_mimi_tt.vocab import MimiVocab

__all__ = [
    "MimiVocab",
    "LlamaMimiTokenizer",
    "llama_mimi_tokenizer",
    "llama_mimi_1b",
    "llama_mimi_8b",
    "llama_mimi_tiny",
]

"""The reference implementation's route from Mimi codes to ids, rebuilt in memory.

llm-jp/llama-mimi formats every code as the string ``<c_q>`` (frame by frame), wraps the
utterance in ``<audio>``/``</audio>`` and runs the Hugging Face Llama 3 tokenizer, to which
``<c_q>`` was added for c outer, q inner, then ``<audio>``, ``</audio>``. Here the base
vocabulary is a stand-in word-level model of the right size (added tokens are matched before the
model runs, so the base model does not affect audio ids).
"""

from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit

from llama_mimi_tt.vocab import MimiVocab


def reference_tokenizer(text_vocab_size: int, num_quantizers: int) -> Tokenizer:
    vocab = {f"t{i}": i for i in range(text_vocab_size - 1)}
    vocab["[UNK]"] = text_vocab_size - 1
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.add_tokens(MimiVocab(text_vocab_size, num_quantizers).token_strings())
    return tok


def reference_string(codes) -> str:
    """codes [Q, F] -> "<audio><c_0><c_1>..</audio>", as the reference's audio_array_to_text."""
    q, f = codes.shape
    flat = codes.T.reshape(-1).tolist()
    parts = [f"<{flat[i + j]}_{j}>" for i in range(0, q * f, q) for j in range(q)]
    return "<audio>" + "".join(parts) + "</audio>"

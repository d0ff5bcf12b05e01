"""The Hugging Face side of a Llama-Mimi checkpoint: config.json and the extended tokenizer.

A released Llama-Mimi checkpoint is a plain ``LlamaForCausalLM`` whose tokenizer has the audio
tokens ``<c_q>`` (c outer, q inner), then ``<audio>``, ``</audio>``, added after the Llama 3 text
vocabulary, so that ``AutoTokenizer`` maps them to our ids (the layout of ``MimiVocab``). This
module builds those files from the base model's tokenizer (the file ``find_text_tokenizer``
picks): a ``tokenizer.json``, or Meta's tiktoken ``tokenizer.model`` converted to a
``tokenizers`` byte-level BPE the way transformers' ``TikTokenConverter`` does (vocabulary = the ranks, merges recovered from them, the Llama 3
pre-tokenizer regex, ``ignore_merges`` so whole pieces in the vocabulary win as in tiktoken).
Only ``tokenizers`` is needed, not transformers.
"""

import json
from pathlib import Path
from typing import Dict, Optional, Tuple

from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

from llama_mimi_tt.tokenizer import BOS, EOS, find_text_tokenizer, llama3_special_tokens
from llama_mimi_tt.vocab import MimiVocab

# Llama 3's pre-tokenizer pattern (tiktoken's cl100k), as in Meta's tokenizer and torchtune's
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's reversible byte -> printable character map (byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1))
    bs += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def tiktoken_to_hf(path: str) -> Tokenizer:
    """Meta's tiktoken ``tokenizer.model`` (or the built-in byte one) as a ``tokenizers``
    Tokenizer that gives the same ids: ranks as ids, Llama 3's 256 special tokens after them,
    ``<|begin_of_text|>`` prepended by the post-processor as in the Hugging Face Llama 3."""
    from tiktoken.load import load_tiktoken_bpe

    try:
        ranks = load_tiktoken_bpe(str(path))
    except Exception as e:  # e.g. a SentencePiece model (Llama 2)
        raise ValueError(
            f"{path} is not a tiktoken BPE file (Llama 3's original/tokenizer.model): {e}"
        ) from e
    byte_char = bytes_to_unicode()

    def to_str(b: bytes) -> str:
        return "".join(byte_char[x] for x in b)

    vocab, merges = {}, []
    for token, rank in ranks.items():
        vocab[to_str(token)] = rank
        if len(token) == 1:
            continue
        local = [
            (token[:i], token[i:], rank)
            for i in range(1, len(token))
            if token[:i] in ranks and token[i:] in ranks
        ]
        local.sort(key=lambda m: (ranks[m[0]], ranks[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: m[2])
    merges = [(to_str(left), to_str(right)) for left, right, _ in merges]

    tok = Tokenizer(BPE(vocab, merges, fuse_unk=False, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [AddedToken(t, normalized=False, special=True) for t in llama3_special_tokens()]
    )
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS}:0 $A:0",
                pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1",
                special_tokens=[(BOS, bos_id)],
            ),
        ]
    )
    return tok


def load_text_tokenizer(path: str) -> Tuple[Tokenizer, Dict, Path]:
    """``(tokenizer, tokenizer_config, file)`` from a checkpoint directory or tokenizer file.
    ``tokenizer_config`` is the ``tokenizer_config.json`` beside a ``tokenizer.json`` ({} if
    none, or for a converted tiktoken file)."""
    file = find_text_tokenizer(path)
    if file.suffix == ".json":
        config_file = file.parent / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        return Tokenizer.from_file(str(file)), config, file
    return tiktoken_to_hf(str(file)), {}, file


def add_audio_tokens(tok: Tokenizer, vocab: MimiVocab, source: str = "tokenizer") -> Tokenizer:
    """Adds ``<c_q>`` (c outer, q inner), ``<audio>``, ``</audio>`` after the text vocabulary,
    as the reference implementation does, so that their ids are ``MimiVocab``'s. A tokenizer
    that already has them (a released Llama-Mimi one) is checked and returned as it is.

    Raises:
        ValueError: the text vocabulary is not T, or the audio tokens present sit elsewhere or
            are for another number of quantizers.
    """
    q, t = vocab.num_quantizers, vocab.text_vocab_size
    first = tok.token_to_id("<0_0>")
    if first is None:
        n = tok.get_vocab_size(with_added_tokens=True)
        if n != t:
            raise ValueError(
                f"{source} has {n} ids but text_vocab_size is {t}: the audio tokens must start "
                f"right after the text vocabulary (set text_vocab_size={n})"
            )
        tok.add_tokens([AddedToken(s, normalized=False) for s in vocab.token_strings()])
    checks = {
        "<0_0>": vocab.audio_offset,
        f"<{vocab.codebook_size - 1}_{q - 1}>": vocab.audio_start_id - 1,
        "<audio>": vocab.audio_start_id,
        "</audio>": vocab.audio_end_id,
    }
    got = {s: tok.token_to_id(s) for s in checks}
    extra_level = tok.token_to_id(f"<0_{q}>")
    if got != checks or extra_level is not None:
        levels = 0
        while tok.token_to_id(f"<0_{levels}>") is not None:
            levels += 1
        raise ValueError(
            f"{source} has audio tokens for num_quantizers={levels} (<0_0> = {first}, <audio> = "
            f"{got['<audio>']}), but the config says num_quantizers={q}, text_vocab_size={t} "
            f"(<0_0> = {vocab.audio_offset}, <audio> = {vocab.audio_start_id})"
        )
    return tok


def _token_content(value) -> Optional[str]:
    return value.get("content") if isinstance(value, dict) else value


def write_tokenizer(out_dir: Path, tok: Tokenizer, vocab: MimiVocab, config: Dict) -> None:
    """Writes ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``.

    ``config`` is the base ``tokenizer_config.json`` ({} for a converted tiktoken file): kept,
    with the audio tokens added to its ``added_tokens_decoder`` when it has one (entries already
    there, from a released Llama-Mimi tokenizer, are kept)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    config = dict(config)
    config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    config.setdefault("bos_token", BOS)
    config.setdefault("eos_token", EOS)
    config.setdefault("clean_up_tokenization_spaces", True)
    config.setdefault("model_input_names", ["input_ids", "attention_mask"])
    config.setdefault("model_max_length", 131072)
    if "added_tokens_decoder" in config:
        decoder = dict(config["added_tokens_decoder"])
        for i, s in enumerate(vocab.token_strings(), start=vocab.audio_offset):
            decoder.setdefault(
                str(i),
                {
                    "content": s,
                    "lstrip": False,
                    "normalized": False,
                    "rstrip": False,
                    "single_word": False,
                    "special": False,
                },
            )
        config["added_tokens_decoder"] = decoder
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special = {
        k: _token_content(config[k])
        for k in ("bos_token", "eos_token", "pad_token", "unk_token")
        if config.get(k) is not None
    }
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def llama_mimi_hf_config(config: Dict, vocab: MimiVocab, vocab_size: int) -> Dict:
    """The base model's config.json with the extended ``vocab_size``, ``num_quantizers`` and
    ``text_vocab_size`` (transformers keeps unknown keys as config attributes)."""
    out = dict(config)
    out["vocab_size"] = vocab_size
    out["num_quantizers"] = vocab.num_quantizers
    out["text_vocab_size"] = vocab.text_vocab_size
    return out

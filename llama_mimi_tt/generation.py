"""Interleaved sampling of Llama-Mimi audio tokens with a static KV cache (gpt-fast style).

Each step draws only among the ids valid at its position (level 0: the level-0 codes, plus
``</audio>`` when stopping is allowed; level q: the level-q codes), so every frame is well formed
by construction, and the logits are computed for that ``[C, D]`` slice of the output projection
only (``LevelHeads``; 2048 rows instead of 136450 for Llama 3 with Q = 4): that is the speed.

The Gumbel noise is a hash of ``(seed_b, step, index)``: a run is reproducible from its seeds, a
sample does not depend on its batch, and no ``torch.Generator`` lives inside a compiled graph.

    out = generate(model, tokenizer.prompt_ids(codes), tokenizer.vocab, max_new_frames=50)
    codes = out.new_codes(0)          # [Q, F] of the generated frames
"""

import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from torchtune.modules import TransformerDecoder
from torchtune.modules.common_utils import delete_kv_caches
from torchtune.modules.tied_linear import TiedLinear

from llama_mimi_tt.vocab import MIMI_FRAME_RATE, MimiVocab

_PAD_ID = 0  # left padding of shorter prompts; masked out, so any valid id works
_CACHE_BUCKET = 256  # with compile, KV-cache lengths are rounded up to a multiple of this


# ---- sampling parameters --------------------------------------------------------------------
@dataclass(frozen=True)
class SamplingParams:
    """Temperature, top-k and top-p of one group of levels (semantic: q = 0; acoustic: q >= 1).

    Args:
        temperature (float): softmax temperature; 0 means greedy (argmax). Default 0.8 (the
            reference's).
        top_k (Optional[int]): keep the k most likely ids of the level (None: all). Default 30
            (the reference's).
        top_p (float): nucleus sampling, keep the smallest set of ids whose probability reaches
            top_p (1.0: off).
    """

    temperature: float = 0.8
    top_k: Optional[int] = 30
    top_p: float = 1.0

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


# What a recipe or a request that names no value gets; everything else reads them from here.
DEFAULT_SAMPLING = SamplingParams()  # the reference's: temperature 0.8, top-k 30, no top-p
DEFAULT_PROMPT_SECONDS = 3.0  # prompt audio kept for a continuation (the eval's generation)
DEFAULT_MAX_NEW_SECONDS = 10.0  # continuation length


# ---- counter-based Gumbel noise -------------------------------------------------------------
_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``(x * c) mod 2**32`` for int64 ``0 <= x < 2**32`` without int64 overflow."""
    lo = (x & 0xFFFF) * c
    hi = (((x >> 16) * c) & 0xFFFF) << 16
    return (lo + hi) & _M32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """Chris Wellons' lowbias32 integer hash on int64 tensors holding 32-bit values."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def seed_keys(seeds: torch.Tensor) -> torch.Tensor:
    """Per-sample 32-bit keys from int64 seeds ``[B]`` (both halves of the seed count)."""
    return _hash32(_hash32(seeds & _M32) ^ ((seeds >> 32) & _M32))


def gumbel_noise(keys: torch.Tensor, step: torch.Tensor, index_hash: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise ``[B, N]`` that depends only on ``(key_b, step, index)``.

    Args:
        keys: ``[B]`` int64 from :func:`seed_keys`.
        step: 0-dim int64, the index of the generated token.
        index_hash: ``[N]`` int64, ``_hash32`` of the candidate indices (precomputed).
    """
    k = _hash32(keys ^ _hash32(step & _M32))
    h = _hash32(k[:, None] ^ index_hash[None, :])
    u = ((h >> 8).float() + 0.5) * (1.0 / (1 << 24))  # uniform in (0, 1), 24 bits
    return -torch.log(-torch.log(u))


def sample_gumbel(
    logits: torch.Tensor, params: SamplingParams, noise: torch.Tensor
) -> torch.Tensor:
    """Index ``[B]`` drawn from ``softmax(logits / T)`` restricted to top-k / top-p.

    Gumbel-max: ``argmax(logits / T + g)`` with ``g ~ Gumbel(0, 1)`` is a draw from the
    softmax, so no normalisation is needed unless top-p asks for probabilities.
    """
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / params.temperature
    n = logits.size(-1)
    if params.top_k is not None and params.top_k < n:
        pivot = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < pivot, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop an id when the ids before it already reach top_p (the first one always stays)
        drop = (probs.cumsum(dim=-1) - probs) >= params.top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return (logits + noise).argmax(dim=-1)


# ---- per-level output heads -----------------------------------------------------------------
def output_weight(model: TransformerDecoder) -> torch.Tensor:
    """The ``[V, D]`` output projection of a torchtune decoder: the embedding when tied, the
    ``output`` weight otherwise (LoRA adapters merged in, NF4 dequantised)."""
    out = model.output
    if isinstance(out, TiedLinear):
        w = out.tied_module.weight
    elif isinstance(out, nn.Module) and hasattr(out, "weight"):
        w = out.weight
    else:
        raise TypeError(f"cannot find the output projection weight of {type(out).__name__}")
    if hasattr(w, "get_original_weight"):  # torchao NF4Tensor (QLoRA)
        w = w.get_original_weight()
    w = w.detach()
    if hasattr(out, "magnitude"):
        raise ValueError("a DoRA output projection: merge the adapter into the weights first")
    if hasattr(out, "lora_a") and not getattr(out, "disabled", False):
        if getattr(out, "merged", False) is False and hasattr(out, "lora_b"):
            scale = out.alpha / out.rank
            w = w + scale * (out.lora_b.weight @ out.lora_a.weight).to(w.dtype)
    return w


class LevelHeads:
    """Contiguous ``[C, D]`` slices of the output projection, one per level, gathered once.

    ``heads[0]`` is ``[C + 1, D]``: the level-0 rows followed by the ``</audio>`` row, so the
    boundary step scores codes and the end marker in one matmul; ``heads[0][:C]`` (a
    contiguous view) is used when stopping is not allowed.
    """

    def __init__(self, model: TransformerDecoder, vocab: MimiVocab):
        w = output_weight(model)
        if w.shape[0] < vocab.size:
            raise ValueError(
                f"the model's output projection has {w.shape[0]} rows but the vocabulary "
                f"(T={vocab.text_vocab_size}, Q={vocab.num_quantizers}) needs {vocab.size}: "
                "num_quantizers or text_vocab_size disagree with the model"
            )
        c = vocab.codebook_size
        self.heads: List[torch.Tensor] = []
        for q in range(vocab.num_quantizers):
            start, stop, step = vocab.level_ids(q)
            rows = w[start:stop:step]
            if q == 0:
                rows = torch.cat([rows, w[vocab.audio_end_id : vocab.audio_end_id + 1]])
            self.heads.append(rows.contiguous())
        self.level0_codes_only = self.heads[0][:c]

    def weight(self, level: int, allow_end: bool) -> torch.Tensor:
        if level == 0:
            return self.heads[0] if allow_end else self.level0_codes_only
        return self.heads[level]

    @property
    def nbytes(self) -> int:
        return sum(h.numel() * h.element_size() for h in self.heads)


# ---- one step -------------------------------------------------------------------------------
def decoder_hidden(
    model: TransformerDecoder,
    tokens: torch.Tensor,
    input_pos: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    last_only: bool = True,
) -> torch.Tensor:
    """The decoder's forward without its output projection (which ``LevelHeads`` or the
    scorer's chunked projection replaces): the final-norm hidden state ``[B, D]`` of the last
    position, or ``[B, S, D]`` of every position with ``last_only=False``."""
    h = model.tok_embeddings(tokens)
    for layer in model.layers:
        h = layer(h, mask=mask, input_pos=input_pos)
    return model.norm(h[:, -1] if last_only else h)


def decode_step(
    model: TransformerDecoder,
    tokens: torch.Tensor,
    input_pos: torch.Tensor,
    mask: torch.Tensor,
    head: torch.Tensor,
    keys: torch.Tensor,
    step: torch.Tensor,
    index_hash: torch.Tensor,
    params: SamplingParams,
) -> torch.Tensor:
    """Runs ``tokens`` ``[B, S]`` through the model (filling the KV cache) and draws the index
    ``[B]`` of the next token among the rows of ``head``. The function that gets compiled."""
    h = decoder_hidden(model, tokens, input_pos, mask)
    logits = F.linear(h, head).float()
    noise = gumbel_noise(keys, step, index_hash[: head.shape[0]])
    return sample_gumbel(logits, params, noise)


# ---- prompts --------------------------------------------------------------------------------
def audio_phase(ids: torch.Tensor, vocab: MimiVocab, name: str = "prompt") -> int:
    """Levels of the partial frame at the end of a prompt that ends inside an audio span
    (``... <audio> frames [partial frame]``); ValueError otherwise."""
    ids = ids.long()
    starts = (ids == vocab.audio_start_id).nonzero().flatten()
    if len(starts) == 0:
        raise ValueError(
            f"{name} has no <audio> (id {vocab.audio_start_id}): a prompt must end inside an "
            "audio span, e.g. <bos> [text] <audio> [frames]"
        )
    tail = ids[int(starts[-1]) + 1 :]
    if (tail == vocab.audio_end_id).any():
        raise ValueError(f"{name}: its last audio span is closed by </audio>; drop the </audio>")
    q = vocab.num_quantizers
    whole = len(tail) - len(tail) % q
    try:
        vocab.decode(tail[:whole])
    except ValueError as e:
        raise ValueError(f"{name}: malformed audio after <audio>: {e}") from e
    partial = tail[whole:]
    if len(partial) and not (
        vocab.is_audio(partial).all()
        and (vocab.level_of(partial) == torch.arange(len(partial))).all()
    ):
        raise ValueError(f"{name}: the partial frame at its end has levels out of order")
    return len(partial)


def _as_prompt_list(prompts) -> List[torch.Tensor]:
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() == 1:
            prompts = prompts[None]
        if prompts.dim() != 2:
            raise ValueError(f"prompt ids must be [B, L] or [L], got shape {tuple(prompts.shape)}")
        return list(prompts.long().cpu())
    out = [torch.as_tensor(p).long().flatten().cpu() for p in prompts]
    if not out:
        raise ValueError("no prompts")
    return out


# ---- the loop -------------------------------------------------------------------------------
@dataclass
class GenerationOutput:
    """What :func:`generate` returns.

    Attributes:
        ids: per sample, the prompt (unpadded) followed by the generated ids, ending with
            ``</audio>`` when the sample stopped by itself.
        generated: ``[B, N]`` the generated ids of all N steps; after a sample's ``</audio>``
            its row holds ``</audio>``.
        num_frames: per sample, frames completed by generation (a partial frame at the end of
            the prompt counts once completed).
        num_new_tokens: per sample, audio tokens generated.
        ended: per sample, whether it drew ``</audio>``.
        prefill_s / decode_s: wall time of the prompt pass and of the token-by-token loop.
    """

    ids: List[torch.Tensor]
    generated: torch.Tensor
    num_frames: List[int]
    num_new_tokens: List[int]
    ended: List[bool]
    prefill_s: float
    decode_s: float
    vocab: MimiVocab = field(repr=False)

    @property
    def wall_s(self) -> float:
        return self.prefill_s + self.decode_s

    @property
    def num_tokens(self) -> int:
        """Audio tokens generated over the batch (``</audio>`` and steps after a stop excluded)."""
        return sum(self.num_new_tokens)

    @property
    def audio_seconds(self) -> float:
        """Seconds of audio generated over the batch."""
        return sum(self.num_frames) / MIMI_FRAME_RATE

    @property
    def tokens_per_s(self) -> float:
        return self.num_tokens / max(self.wall_s, 1e-9)

    @property
    def rtf(self) -> float:
        """Real-time factor: wall time / seconds of generated audio (< 1 is faster than real
        time). Batched audio counts once per sample."""
        seconds = self.audio_seconds
        return self.wall_s / seconds if seconds else float("inf")

    def new_codes(self, b: int) -> torch.Tensor:
        """Codes ``[Q, F]`` of the frames generated for sample ``b``."""
        q = self.vocab.num_quantizers
        n = self.num_frames[b]
        ids = self.ids[b]
        if ids[-1] == self.vocab.audio_end_id:
            ids = ids[:-1]
        if n == 0:
            return torch.zeros(q, 0, dtype=torch.long)
        return self.vocab.decode(ids[len(ids) - n * q :])


@torch.no_grad()
def generate(
    model: TransformerDecoder,
    prompts: Union[torch.Tensor, Sequence[torch.Tensor]],
    vocab: MimiVocab,
    max_new_frames: int,
    *,
    semantic: SamplingParams = SamplingParams(),
    acoustic: SamplingParams = SamplingParams(),
    seed: Union[int, Sequence[int]] = 0,
    stop_at_end: bool = True,
    min_new_frames: int = 0,
    check_stop_every: int = 4,
    compile: bool = False,
    compile_mode: Optional[str] = None,
    on_frame: Optional[Callable[[int, torch.Tensor, torch.Tensor], None]] = None,
) -> GenerationOutput:
    """Continues the audio at the end of each prompt with well-formed frames.

    Args:
        model (TransformerDecoder): a torchtune Llama-Mimi decoder (eval mode is set here).
            KV caches are set up for this call and deleted after it.
        prompts: ids ``[B, L]`` (prompts of one length) or a list of 1-D id tensors of any
            lengths, which are left-padded and masked (positions shifted so each prompt starts
            at 0, as torchtune's ``generate`` does). Every prompt must end inside an audio span
            (``<bos> [text] <audio> [frames]``), all at the same level of their frame
            (normally a frame boundary).
        vocab (MimiVocab): the token layout (T, Q).
        max_new_frames (int): frames to generate at most (a partial prompt frame, once
            completed, counts as one).
        semantic (SamplingParams): sampling of level 0 (and ``</audio>``).
        acoustic (SamplingParams): sampling of levels 1..Q-1.
        seed: one int per sample, or one int: sample b then uses ``seed + b``. A sample's
            tokens depend only on its prompt, its seed and the settings.
        stop_at_end (bool): allow ``</audio>`` at frame boundaries; a sample that draws it
            stops. Otherwise exactly ``max_new_frames`` frames are generated.
        min_new_frames (int): ``</audio>`` is not allowed before this many frames.
        check_stop_every (int): frames between checks whether every sample has stopped (the
            only host sync of the loop, unless ``on_frame`` is given).
        compile (bool): ``torch.compile`` the one-token step: a graph per head shape (level 0
            with and without ``</audio>``, q >= 1), batch size and KV-cache length (rounded
            up to a multiple of 256 so that most requests reuse the graphs).
        compile_mode (Optional[str]): passed to ``torch.compile`` (e.g. "reduce-overhead").
        on_frame: called as ``on_frame(frame_index, frame_ids [B, Q], active [B])`` each time a
            frame is completed (``active``: the sample had not stopped before this frame).
            Used for streaming decoding and progress bars.

    Returns:
        GenerationOutput: ids, frames, stop flags and timings (``tokens_per_s``, ``rtf``).
    """
    plist = _as_prompt_list(prompts)
    phase, seeds, max_steps = _check_request(model, plist, vocab, max_new_frames, seed)
    # not .weight: on a LoRA model that property concatenates the text and audio rows
    emb = next(model.tok_embeddings.parameters())
    device, dtype = emb.device, emb.dtype
    if not dtype.is_floating_point:
        dtype = torch.bfloat16
    model.eval()
    heads = LevelHeads(model, vocab)
    batch = _PaddedBatch.of(plist, max_steps, device, model.max_seq_len, bucket=compile)
    step_fn = decode_step
    if compile:
        step_fn = torch.compile(decode_step, mode=compile_mode, dynamic=False)

    if model.caches_are_setup():
        delete_kv_caches(model)
    with device:  # torchtune makes the cache buffers on the default device
        model.setup_caches(len(plist), dtype, decoder_max_seq_len=batch.cache_len)
    try:
        generated, prefill_s, decode_s = _decode_loop(
            model,
            step_fn,
            heads,
            vocab,
            batch,
            seeds,
            phase=phase,
            max_steps=max_steps,
            params=(semantic, acoustic),
            stop_at_end=stop_at_end,
            min_new_frames=min_new_frames,
            check_stop_every=check_stop_every,
            on_frame=on_frame,
        )
    finally:
        delete_kv_caches(model)
    return _assemble_output(plist, generated, phase, vocab, prefill_s, decode_s)


def _check_request(model, plist: List[torch.Tensor], vocab: MimiVocab, max_new_frames: int, seed):
    """``(phase, seeds, max_steps)`` of a request, every input checked first."""
    bsz, q_levels = len(plist), vocab.num_quantizers
    if max_new_frames < 1:
        raise ValueError(f"max_new_frames must be >= 1, got {max_new_frames}")
    if model.tok_embeddings.num_embeddings < vocab.size:
        raise ValueError(
            f"the model's embedding has {model.tok_embeddings.num_embeddings} rows but the "
            f"vocabulary (T={vocab.text_vocab_size}, Q={q_levels}) needs {vocab.size}"
        )
    phases = {audio_phase(p, vocab, name=f"prompt {i}") for i, p in enumerate(plist)}
    if len(phases) != 1:
        raise ValueError(f"prompts end at different levels of their frames {sorted(phases)}")
    phase = phases.pop()
    seeds = [seed + b for b in range(bsz)] if isinstance(seed, int) else [int(s) for s in seed]
    if len(seeds) != bsz:
        raise ValueError(f"{len(seeds)} seeds for {bsz} prompts")
    longest = max(len(p) for p in plist)
    max_steps = max_new_frames * q_levels - phase
    if longest + max_steps > model.max_seq_len:
        raise ValueError(
            f"a prompt of {longest} tokens plus {max_steps} new tokens "
            f"({max_new_frames} frames) exceeds the model's max_seq_len={model.max_seq_len}: "
            f"shorten the prompt to at most {model.max_seq_len - max_steps} tokens or ask for fewer frames"
        )
    return phase, seeds, max_steps


@dataclass
class _PaddedBatch:
    """Prompts left-padded to one length, with the masks and positions of the KV cache:
    positions start at 0 at each prompt's first real token, padding is never attended."""

    tokens: torch.Tensor  # [B, plen]
    pad: torch.Tensor  # [B] padding tokens before each prompt
    key_pos: torch.Tensor  # [cache_len]
    key_valid: torch.Tensor  # [B, cache_len], False on padding
    prefill_mask: torch.Tensor  # [B, plen, cache_len]
    prefill_pos: torch.Tensor  # [B, plen]
    cache_len: int

    @classmethod
    def of(cls, plist, max_steps: int, device, max_seq_len: int, bucket: bool) -> "_PaddedBatch":
        """``bucket``: round the cache length up to a multiple of ``_CACHE_BUCKET`` (static
        shapes: one compiled graph serves every request up to the next bucket)."""
        lengths = [len(p) for p in plist]
        plen = max(lengths)
        pad = torch.tensor([plen - n for n in lengths], device=device)
        tokens = torch.full((len(plist), plen), _PAD_ID, dtype=torch.long)
        for b, p in enumerate(plist):
            tokens[b, plen - len(p) :] = p
        cache_len = plen + max_steps
        if bucket:
            cache_len = min(-(-cache_len // _CACHE_BUCKET) * _CACHE_BUCKET, max_seq_len)
        key_pos = torch.arange(cache_len, device=device)
        key_valid = key_pos[None, :] >= pad[:, None]
        causal = key_pos[None, :plen, None] >= key_pos[None, None, :]
        prefill_mask = causal & key_valid[:, None, :]
        prefill_mask |= torch.eye(plen, cache_len, dtype=torch.bool, device=device)  # no empty rows
        prefill_pos = (key_pos[None, :plen] - pad[:, None]).clamp(min=0)
        return cls(tokens.to(device), pad, key_pos, key_valid, prefill_mask, prefill_pos, cache_len)


def _decode_loop(
    model,
    step_fn,
    heads: LevelHeads,
    vocab: MimiVocab,
    batch: _PaddedBatch,
    seeds: List[int],
    *,
    phase: int,
    max_steps: int,
    params: tuple,
    stop_at_end: bool,
    min_new_frames: int,
    check_stop_every: int,
    on_frame,
):
    """The prompt pass, then one token per step: ``(generated [B, n] on the CPU, prefill_s,
    decode_s)``. ``params`` is ``(semantic, acoustic)``."""
    device = batch.tokens.device
    bsz, plen = batch.tokens.shape
    q_levels, c = vocab.num_quantizers, vocab.codebook_size
    keys = seed_keys(torch.tensor(seeds, dtype=torch.long, device=device))
    index_hash = _hash32(torch.arange(c + 1, device=device))
    generated = torch.full((bsz, max_steps), vocab.audio_end_id, dtype=torch.long, device=device)
    finished = torch.zeros(bsz, dtype=torch.bool, device=device)
    frames_done = 0

    def ids_of(index, level, allow_end):
        ids = vocab.code_ids(index, level)
        if allow_end:
            ids = torch.where(index == c, vocab.audio_end_id, ids)
        return ids

    t0 = time.perf_counter()
    pos = torch.tensor(plen, device=device)  # cache slot of the next token fed
    step = torch.zeros((), dtype=torch.long, device=device)
    n_steps = 0
    x = batch.tokens  # fed to the model: the prompt first, then the last token drawn
    for n in range(max_steps):
        level = (phase + n) % q_levels
        frame_index = (phase + n) // q_levels  # index of the frame this token belongs to
        allow_end = stop_at_end and level == 0 and frame_index >= min_new_frames
        head = heads.weight(level, allow_end)
        level_params = params[0] if level == 0 else params[1]
        if n == 0:
            index = decode_step(
                model, x, batch.prefill_pos, batch.prefill_mask, head, keys, step, index_hash,
                level_params,
            )  # fmt: skip
            if device.type == "cuda":
                torch.cuda.synchronize()
            t1 = time.perf_counter()
        else:
            mask = (batch.key_valid & (batch.key_pos <= pos))[:, None, :]
            index = step_fn(
                model, x, (pos - batch.pad)[:, None], mask, head, keys, step, index_hash,
                level_params,
            )  # fmt: skip
            pos += 1
        new = ids_of(index, level, allow_end)
        if allow_end:
            finished |= new == vocab.audio_end_id
        x = torch.where(finished, vocab.audio_end_id, new)[:, None]  # fed at the next step
        generated[:, n] = x[:, 0]
        step += 1
        n_steps = n + 1
        if level == q_levels - 1:  # a frame was completed
            frames_done += 1
            if on_frame is not None:
                if n + 1 >= q_levels:
                    frame = generated[:, n + 1 - q_levels : n + 1]
                else:  # completes the prompt's partial frame
                    frame = torch.cat([batch.tokens[:, plen - phase :], generated[:, : n + 1]], 1)
                on_frame(frames_done - 1, frame, ~finished)
        if allow_end and frame_index % check_stop_every == 0 and bool(finished.all()):
            break
    generated = generated[:, :n_steps].cpu()
    t2 = time.perf_counter()
    return generated, t1 - t0, t2 - t1


def _assemble_output(
    plist, generated: torch.Tensor, phase: int, vocab: MimiVocab, prefill_s: float, decode_s: float
) -> GenerationOutput:
    """Each prompt followed by its generated ids, cut after its ``</audio>``."""
    ids, num_frames, num_new, ended = [], [], [], []
    for b, p in enumerate(plist):
        row = generated[b]
        stops = (row == vocab.audio_end_id).nonzero().flatten()
        n_audio = int(stops[0]) if len(stops) else len(row)
        ended.append(bool(len(stops)))
        num_frames.append((phase + n_audio) // vocab.num_quantizers)
        num_new.append(n_audio)
        ids.append(torch.cat([p, row[: n_audio + (1 if len(stops) else 0)]]))
    return GenerationOutput(
        ids=ids,
        generated=generated,
        num_frames=num_frames,
        num_new_tokens=num_new,
        ended=ended,
        prefill_s=prefill_s,
        decode_s=decode_s,
        vocab=vocab,
    )

"""Speech continuation with Llama-Mimi: ``tune run llama_mimi_generate --config generate``.

Prompt audio files (any rate, any channel count), prompt codes (``.pt`` / ``.npy``) and/or a
text prompt (tts models only) -> continuation .wav files. Every prompt gets ``num_samples``
samples, all generated in one batch (``batch_size`` caps it). Sample ``k`` of any prompt uses
seed ``seed + k``, so a prompt run alone or with others gives the same audio.

Outputs in ``output_dir``, per prompt ``<name>`` and sample ``k``:

    <name>_s<k>_continuation.wav   the generated frames, decoded alone
    <name>_s<k>_full.wav           prompt + continuation, decoded together
    <name>_s<k>_codes.pt           the generated codes [Q, F] (int64; usable as prompt_codes)
    summary.json                   frames, seconds, tokens/s, real-time factor per run and sample

With ``streaming: True`` the continuation is decoded by the codec's streaming decoder
(``MimiCodec.streaming_decoder``) and appended
to ``<name>_s<k>_continuation.wav`` frame by frame while generating (flushed after each frame);
it equals the non-streaming decode within 1e-5 (float) / 1 LSB (16-bit file).
"""

import json
import sys
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import numpy as np
import soundfile as sf
import torch
from omegaconf import DictConfig, ListConfig
from torchtune import config, training, utils
from tqdm import tqdm

from llama_mimi_tt.audio import save_audio
from llama_mimi_tt.errors import MissingFileError, UserError, writing
from llama_mimi_tt.generation import (
    DEFAULT_SAMPLING,
    GenerationOutput,
    SamplingParams,
    generate,
)
from llama_mimi_tt.loading import load_model, random_weights
from llama_mimi_tt.quantize import parse_quantize, quantize_model
from llama_mimi_tt.recipe_config import check_number, check_output_dir, run_recipe
from llama_mimi_tt.vocab import MAX_QUANTIZERS, MIMI_FRAME_RATE

log = utils.get_logger("INFO")


@dataclass
class Prompt:
    name: str
    ids: torch.Tensor  # <bos> [text] <audio> frames
    codes: torch.Tensor  # [Q, F] prompt audio (F may be 0)
    text: Optional[str]


# ---- setup ------------------------------------------------------------------------------------
def _as_list(value) -> list:
    if value is None:
        return []
    if isinstance(value, (list, tuple, ListConfig)):
        return list(value)
    return [value]


def load_codes_file(path: str, codec) -> torch.Tensor:
    """Codes ``[Q', F]`` from ``.pt`` or ``.npy``: Q' = Q, or more levels (up to Mimi's 32) of
    which the first Q are kept. ``[F, Q]`` (transposed) is an error that says so."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"prompt codes {p} is a folder, not a codes file (.pt / .npy)")
    if not p.is_file():
        raise MissingFileError(f"prompt codes file not found: {p}")
    what = (
        f"{p} is not a codes file: expected a tensor [Q, frames] of integer codes saved with "
        "torch.save (or numpy.save), like the <name>_s<k>_codes.pt files this recipe writes"
    )
    try:
        if p.suffix == ".npy":
            codes = torch.from_numpy(np.load(p, allow_pickle=False))
        else:
            codes = torch.load(p, map_location="cpu", weights_only=True)
            if isinstance(codes, dict):
                codes = codes.get("codes")
    except Exception as e:  # unpickling / format errors come in many types
        raise UserError(what) from e  # torch's text advises weights_only=False: never do that
    if not isinstance(codes, torch.Tensor):
        raise UserError(what + " (or a dict with 'codes')")
    q = codec.num_quantizers
    if codes.dim() == 1 and q == 1:
        codes = codes[None]
    shape = tuple(codes.shape)
    if codes.dim() != 2 or not q <= shape[0] <= MAX_QUANTIZERS or (shape[0] != q == shape[1]):
        transposed = codes.dim() == 2 and shape[1] == q and shape[0] != q
        raise UserError(
            f"{p}: expected codes of shape [{q}, frames] for num_quantizers={q} (or [Q', frames] "
            f"with {q} < Q' <= {MAX_QUANTIZERS} levels, of which the first {q} are kept), got "
            f"{list(shape)}"
            + (": that looks like [frames, levels]; save codes.T instead" if transposed else "")
        )
    if shape[1] == 0:
        raise UserError(f"{p}: the prompt codes have no frames")
    return codec.check_codes(codes[:q], name=str(p))


def check_text_side(cfg: DictConfig) -> List[str]:
    """The text prompts; a clear error when the model has no text side."""
    texts = [str(t) for t in _as_list(cfg.get("prompt_text"))]
    if texts and not cfg.get("model_has_text", False):
        raise UserError(
            "prompt_text is given but this config's model has no text side "
            "(model_has_text: False): it was trained on audio only (a2a) and a text prompt "
            "would be silently meaningless. Drop prompt_text, or set model_has_text=True for a "
            "model fine-tuned on the tts task."
        )
    return texts


def build_prompts(cfg: DictConfig, tokenizer, codec) -> List[Prompt]:
    """Prompts from ``prompt_audio``, ``prompt_codes`` and ``prompt_text``.

    One prompt per audio or codes file. ``prompt_text`` (tts models only) is one string for
    every prompt, or one string per prompt; with no audio or codes, each string is a text-only
    prompt. With nothing at all, one unconditional prompt ``<bos> <audio>``.
    """
    audio = [("audio", str(p)) for p in _as_list(cfg.get("prompt_audio"))]
    codes = [("codes", str(p)) for p in _as_list(cfg.get("prompt_codes"))]
    texts = check_text_side(cfg)
    sources = audio + codes
    if not sources:
        sources = [("text", None)] * len(texts) if texts else [("uncond", None)]
    if len(texts) > 1 and len(texts) != len(sources):
        raise UserError(
            f"{len(texts)} prompt_text strings for {len(sources)} audio/codes prompts: give one "
            "string for all of them or one per prompt"
        )
    prompts, seen = [], {}
    for i, (kind, path) in enumerate(sources):
        text = texts[i] if len(texts) > 1 else (texts[0] if texts else None)
        if text is not None and not text.strip():
            raise UserError(f"prompt_text {i} is empty")
        if kind == "audio":
            c = codec.encode_file(path)
            if c.shape[-1] == 0:
                raise UserError(f"{path}: too short for one Mimi frame (80 ms)")
        elif kind == "codes":
            c = load_codes_file(path, codec)
        else:
            c = torch.zeros(tokenizer.vocab.num_quantizers, 0, dtype=torch.long)
        name = Path(path).stem if path else ("uncond" if kind == "uncond" else f"text{i}")
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:  # the same file (or file name) twice: codes, codes_1, ...
            name = f"{name}_{seen[name] - 1}"
        prompts.append(Prompt(name=name, ids=tokenizer.prompt_ids(c, text), codes=c, text=text))
    return prompts


def check_context(prompts: List[Prompt], max_new_frames: int, max_seq_len: int, q: int):
    """A clear error for a prompt that leaves no room for the requested frames."""
    for p in prompts:
        if len(p.ids) + max_new_frames * q > max_seq_len:
            room = (max_seq_len - max_new_frames * q - len(p.ids) + len(p.codes[0]) * q) // q
            raise UserError(
                f"prompt {p.name!r} is too long: {len(p.ids)} tokens ({p.codes.shape[-1]} frames) "
                f"+ {max_new_frames * q} new tokens ({max_new_frames / MIMI_FRAME_RATE:.2f} s) exceed "
                f"the context of max_seq_len={max_seq_len}. Lower max_seconds or use at most "
                f"{max(room, 0)} prompt frames ({max(room, 0) / MIMI_FRAME_RATE:.2f} s)."
            )


# ---- streaming ------------------------------------------------------------------------------
class StreamingWriter:
    """Decodes each generated frame of a batch with the codec's streaming decoder (batched)
    and appends it to one .wav per sample, flushing after every frame."""

    def __init__(self, codec, vocab, paths: List[Path]):
        self.vocab = vocab
        with ExitStack() as stack:  # what was opened is closed again if the rest fails
            self.files = [
                stack.enter_context(
                    sf.SoundFile(
                        str(p), "w", samplerate=codec.sample_rate, channels=1, subtype="PCM_16"
                    )
                )
                for p in paths
            ]
            self.decoder = stack.enter_context(codec.streaming_decoder(batch_size=len(paths)))
            self._open = stack.pop_all()

    def __call__(self, frame_index: int, frame_ids: torch.Tensor, active: torch.Tensor):
        wave = self.decoder.decode_frame_ids(frame_ids, self.vocab)  # [B, 1, 1920]
        for f, w, a in zip(self.files, wave, active.cpu().tolist()):
            if a:
                f.write(np.clip(w[0].numpy(), -1.0, 1.0))
                f.flush()

    def close(self):
        """Leaves the decoder's streaming mode, then closes the files."""
        self._open.close()


# ---- main -----------------------------------------------------------------------------------
def sampling_params(cfg: DictConfig, key: str) -> SamplingParams:
    """``semantic`` / ``acoustic``, every number checked and named."""
    d = DEFAULT_SAMPLING
    check_number(cfg, f"{key}.temperature", float, low=0, default=d.temperature)
    check_number(cfg, f"{key}.top_k", int, low=1, optional=True, default=d.top_k)
    check_number(cfg, f"{key}.top_p", float, low=0, high=1, default=d.top_p)
    try:
        return SamplingParams(**cfg.get(key, {}))
    except ValueError as e:
        raise UserError(f"{key}: {e}") from None


def check_settings(cfg: DictConfig) -> None:
    """Every number of the config, checked before anything is loaded."""
    check_number(cfg, "num_quantizers", int, low=1, high=MAX_QUANTIZERS)
    check_number(cfg, "seed", int, low=0)
    check_number(cfg, "num_samples", int, low=1, default=1)
    check_number(cfg, "batch_size", int, low=1, optional=True)
    check_number(cfg, "max_seconds", float, low=1 / MIMI_FRAME_RATE)
    check_number(cfg, "min_new_frames", int, low=0, default=0)
    sampling_params(cfg, "semantic")
    sampling_params(cfg, "acoustic")


@dataclass
class Setup:
    """What a run needs, loaded and checked."""

    tokenizer: object
    codec: object
    model: torch.nn.Module
    prompts: List[Prompt]
    max_new_frames: int
    quant: object
    device: torch.device
    dtype: torch.dtype
    out_dir: Path


def setup(cfg: DictConfig) -> Setup:
    """Checks the config, then loads the tokenizer, codec, prompts and model (in that order:
    cheap errors first)."""
    check_settings(cfg)
    check_text_side(cfg)  # before the (slow) codec and model
    quant = parse_quantize(cfg.get("quantize"), cfg.get("quantize_group_size", 128))
    device = utils.get_device(cfg.get("device", "cpu"))
    dtype = training.get_dtype(cfg.get("dtype", "fp32"), device)
    out_dir = check_output_dir(cfg.output_dir)

    tokenizer = config.instantiate(cfg.tokenizer)
    vocab = tokenizer.vocab
    codec = config.instantiate(cfg.codec)
    if str(cfg.codec.get("path")) == "random":
        log.warning("!!! codec.path=random: an UNTRAINED Mimi decodes the codes. !!!")
    if codec.num_quantizers != vocab.num_quantizers:
        raise UserError(
            f"the codec has num_quantizers={codec.num_quantizers} but the tokenizer "
            f"{vocab.num_quantizers}: set both from one num_quantizers"
        )
    prompts = build_prompts(cfg, tokenizer, codec)
    max_new_frames = int(cfg.max_seconds * MIMI_FRAME_RATE)
    if max_new_frames < 1:
        raise UserError(f"max_seconds={cfg.max_seconds} is shorter than one frame (0.08 s)")
    model = load_model(cfg, device, dtype)
    model = quantize_model(model, quant, device)
    dtype = quant.activation_dtype(device) or dtype
    log.info(f"precision: {quant.describe(device)}")
    check_context(prompts, max_new_frames, model.max_seq_len, vocab.num_quantizers)
    return Setup(tokenizer, codec, model, prompts, max_new_frames, quant, device, dtype, out_dir)


def generate_batch(cfg: DictConfig, run: Setup, batch, stems: List[Path]) -> GenerationOutput:
    """One batch of (prompt, sample) jobs, with a progress bar and, when streaming, the
    continuations written frame by frame."""
    bar = tqdm(total=run.max_new_frames, desc="frames", unit="frame")
    writer = None
    if cfg.get("streaming", False):
        with writing(f"{stems[0]}_continuation.wav"):
            writer = StreamingWriter(
                run.codec, run.tokenizer.vocab, [Path(f"{s}_continuation.wav") for s in stems]
            )

    def on_frame(i, frame_ids, active):
        if writer is not None:
            writer(i, frame_ids, active)
        bar.update(1)

    try:
        return generate(
            run.model,
            [p.ids for p, _ in batch],
            run.tokenizer.vocab,
            run.max_new_frames,
            semantic=sampling_params(cfg, "semantic"),
            acoustic=sampling_params(cfg, "acoustic"),
            seed=[int(cfg.seed) + k for _, k in batch],
            stop_at_end=bool(cfg.get("stop_at_end", True)),
            min_new_frames=int(cfg.get("min_new_frames", 0)),
            compile=bool(cfg.get("compile", False)),
            compile_mode=cfg.get("compile_mode"),
            on_frame=on_frame,
        )
    finally:
        bar.close()
        if writer is not None:
            writer.close()


def save_batch(
    cfg: DictConfig, run: Setup, batch, stems: List[Path], out: GenerationOutput
) -> List[dict]:
    """Writes each sample's codes and .wav files; its summary record."""
    codec, records = run.codec, []
    for b, ((p, k), stem) in enumerate(zip(batch, stems)):
        new = out.new_codes(b)
        with writing(f"{stem}_codes.pt"):
            torch.save(new.clone(), f"{stem}_codes.pt")
        if not cfg.get("streaming", False):
            wave = codec.decode(new) if new.shape[-1] else torch.zeros(1, 0)
            with writing(f"{stem}_continuation.wav"):
                save_audio(f"{stem}_continuation.wav", wave, codec.sample_rate)
        full = torch.cat([p.codes, new], dim=-1)
        wave = codec.decode(full) if full.shape[-1] else torch.zeros(1, 0)
        with writing(f"{stem}_full.wav"):
            save_audio(f"{stem}_full.wav", wave, codec.sample_rate)
        records.append(
            dict(
                name=p.name,
                sample=k,
                seed=int(cfg.seed) + k,
                text=p.text,
                prompt_frames=int(p.codes.shape[-1]),
                frames=out.num_frames[b],
                seconds=out.num_frames[b] / MIMI_FRAME_RATE,
                ended_with_audio_end=out.ended[b],
                continuation=f"{stem.name}_continuation.wav",
                full=f"{stem.name}_full.wav",
                codes=f"{stem.name}_codes.pt",
            )
        )
    return records


def write_summary(cfg: DictConfig, run: Setup, records: List[dict], totals: dict) -> None:
    """``summary.json`` and the closing log lines."""
    audio_s = totals["frames"] / MIMI_FRAME_RATE
    summary = dict(
        random_weights=random_weights(cfg),
        num_quantizers=run.tokenizer.vocab.num_quantizers,
        max_seconds=float(cfg.max_seconds),
        streaming=bool(cfg.get("streaming", False)),
        compile=bool(cfg.get("compile", False)),
        compile_mode=cfg.get("compile_mode"),
        device=str(run.device),
        dtype=str(run.dtype),
        quantize=run.quant.precision,
        precision=run.quant.describe(run.device),
        tokens=totals["tokens"],
        frames=totals["frames"],
        audio_seconds=audio_s,
        wall_s=totals["wall_s"],
        prefill_s=totals["prefill_s"],
        decode_s=totals["decode_s"],
        tokens_per_s=totals["tokens"] / max(totals["wall_s"], 1e-9),
        rtf=totals["wall_s"] / audio_s if audio_s else None,
        samples=records,
    )
    out_dir = run.out_dir
    with writing(out_dir / "summary.json"):
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    rtf = f"{summary['rtf']:.3f}" if summary["rtf"] is not None else "n/a"
    log.info(
        f"generated {totals['frames']} frames ({audio_s:.2f} s of audio) in {totals['wall_s']:.2f} s: "
        f"{summary['tokens_per_s']:.1f} tokens/s, real-time factor {rtf}. Wrote {len(records)} "
        f"sample(s) to {out_dir} (summary.json)"
    )
    if summary["random_weights"]:
        log.warning("!!! random weights: the .wav files are NOT speech. !!!")


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    run = setup(cfg)
    num_samples = int(cfg.get("num_samples", 1))
    jobs = [(p, k) for p in run.prompts for k in range(num_samples)]
    batch_size = int(cfg.get("batch_size") or len(jobs))
    log.info(
        f"{len(run.prompts)} prompt(s) x {num_samples} sample(s), up to {cfg.max_seconds} s "
        f"each; semantic {sampling_params(cfg, 'semantic')}, acoustic "
        f"{sampling_params(cfg, 'acoustic')}{', streaming' if cfg.get('streaming') else ''}"
    )
    records, totals = [], dict(tokens=0, frames=0, wall_s=0.0, prefill_s=0.0, decode_s=0.0)
    for start in range(0, len(jobs), batch_size):
        batch = jobs[start : start + batch_size]
        stems = [run.out_dir / f"{p.name}_s{k}" for p, k in batch]
        out = generate_batch(cfg, run, batch, stems)
        records += save_batch(cfg, run, batch, stems, out)
        totals["tokens"] += out.num_tokens
        totals["frames"] += sum(out.num_frames)
        for key in ("wall_s", "prefill_s", "decode_s"):
            totals[key] += getattr(out, key)
    write_summary(cfg, run, records, totals)


if __name__ == "__main__":
    sys.exit(run_recipe(recipe_main, "llama_mimi_generate"))

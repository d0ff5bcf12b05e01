"""Pre-encoding throughput in audio seconds per second: our cache path against one utterance
at a time (the reference's way), on the same files with the same ``MimiCodec.random``.

Ours: ``code_cache.encode_items``, what ``tune run llama_mimi_tokenize`` runs per shard: read
every file (16 kHz wav), resample to 24 kHz, sort by length, encode in batches with
``MimiCodec.encode_batch``. Peer: for each file, read, resample, ``MimiCodec.encode``.

Utterance lengths are LibriSpeech-like (gamma, mean 12.3 s, sd 3.9 s, as in bench_packing);
the quick setting uses fewer and shorter files. The two routes alternate group by group, so
that both see the same load on a shared machine. Codes are compared level by level: they agree except for rare flips of near-tie
codes at deep levels (float rounding differs between a padded batch and a single item; the
random codec's codebooks are fitted by jittered kernel density, so near-ties are common).
"""

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_packing import librispeech_like_seconds  # noqa: E402

from llama_mimi_tt.audio import load_audio, synthetic_audio  # noqa: E402
from llama_mimi_tt.audio_sources import open_audio_source  # noqa: E402
from llama_mimi_tt.code_cache import encode_items  # noqa: E402
from llama_mimi_tt.codec import MimiCodec  # noqa: E402


def run(quick: bool = False) -> list:
    n, q, batch_size = (8, 8, 8) if quick else (16, 8, 8)
    seconds = librispeech_like_seconds(n, seed=3) * (0.4 if quick else 1.0)
    codec = MimiCodec.random(num_quantizers=q, seed=0)
    with tempfile.TemporaryDirectory() as d:
        for i, s in enumerate(seconds):
            wave = synthetic_audio(s, 16000, seed=i)[0].numpy()
            sf.write(Path(d) / f"utt{i:03d}.wav", wave, 16000)
        src = open_audio_source(d)
        total = float(sum(sf.info(it.path).duration for it in src.items))
        codec.encode(synthetic_audio(1.0, 24000, seed=99)[0], 24000)  # warm-up
        # Shard-sized groups of similar length, timed alternately so that both routes see
        # the same machine load (this machine is shared).
        items = sorted(src.items, key=lambda it: src.seconds_hint(it))
        groups = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
        times = {"ours": 0.0, "peer": 0.0}
        out = {"ours": {}, "peer": {}}
        for k, group in enumerate(groups):
            for name in ("ours", "peer") if k % 2 == 0 else ("peer", "ours"):
                t0 = time.perf_counter()
                if name == "ours":
                    rows, skipped = encode_items(
                        src, group, codec, batch_size=batch_size, max_batch_seconds=None
                    )
                    assert not skipped
                    out[name].update((r["id"], r["codes"].astype(np.int64)) for r in rows)
                else:
                    for it in group:
                        wave = load_audio(it.path, 24000)
                        out[name][it.id] = codec.encode(wave, 24000).numpy()
                times[name] += time.perf_counter() - t0

    a = np.concatenate([out["ours"][k] for k in sorted(out["ours"])], axis=1)
    b = np.concatenate([out["peer"][k] for k in sorted(out["peer"])], axis=1)
    assert a.shape == b.shape, "the two routes give different frame counts"
    per_level = (a == b).mean(axis=1)
    agree = float((a == b).mean())
    assert per_level[0] >= 0.999 and agree >= 0.99, f"codes disagree: {per_level}"
    if (a == b).all():
        same = "codes identical"
    else:
        levels = ", ".join(f"{100 * x:.1f}" for x in per_level)
        same = f"codes agree {100 * agree:.2f}% (per level {levels})"
    ratio = times["peer"] / times["ours"]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return [
        {
            "benchmark": (
                f"Mimi pre-encoding, {n} files, {total:.0f} s of audio, Q={q}, batches of "
                f"{batch_size}, CPU ({torch.get_num_threads()} threads)"
            ),
            "metric": "audio s/s",
            "ours": total / times["ours"],
            "peer": total / times["peer"],
            "peer_name": "reference: one utterance at a time (read, resample, encode)",
            "ratio": ratio,
            "goal": ">= 2x",
            "met": bool(ratio >= 2.0),
            "notes": (
                f"{same}; load average {load:.1f} on {os.cpu_count()} cores (shared: the "
                "figures move with the load). On CPU, Mimi's convolutions and elementwise ops "
                "are memory-bound and a batch falls out of cache (profiled at 1 thread: 8 x "
                "4 s as one batch costs 1.19x the CPU time of 8 single calls), so batching buys "
                "little here and batch_size=auto encodes one at a time on CPU; batches are for "
                "GPUs, where one utterance leaves the device idle"
            ),
        }
    ]


if __name__ == "__main__":
    for row in run(quick="--quick" in sys.argv):
        print(row)

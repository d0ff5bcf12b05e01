"""``quantize: none | bf16 | int8 | int4 | w8a8 | w4a8``: logits close to fp32, generate and eval
run, batch == single, the recipes report the precision, bad values are clear errors.

The tiny model (4 layers, 128 wide, MLP 384, k/v 64 rows) with N(0, 0.02) weights: every linear
layer has in_features a multiple of 128 and out_features a multiple of 16, so int4 with group
size 128 applies to it. Its logits reach about +-1.5, the logit differences below are measured
(bf16 0.010, int8 0.020, int4 0.28; w8a8 and w4a8 as int8 and int4 were with int8 activations)
with about 2x headroom.
"""

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llama_mimi_tt.errors import UserError
from llama_mimi_tt.generation import SamplingParams, generate
from llama_mimi_tt.models import llama_mimi_tiny
from llama_mimi_tt.quantize import (
    PRECISIONS,
    Bf16Linear,
    InBf16,
    Int8Linear,
    QuantSpec,
    W4A8Linear,
    W8A8Linear,
    parse_quantize,
    quantize_model,
    weight_bytes_per_token,
)
from llama_mimi_tt.vocab import MimiVocab

torch.set_num_threads(1)

Q = 4
VOCAB = MimiVocab(text_vocab_size=512, num_quantizers=Q)
BOS = 256
CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parents[1]
# precision: (max |logit - fp32 logit|, mean KL(fp32 || precision), top-1 agreement at least)
BOUNDS = {
    "none": (0.0, 0.0, 1.0),  # the model as loaded: PyTorch's code, the same logits
    "bf16": (0.03, 1e-5, 0.9),
    "int8": (0.05, 5e-5, 0.9),
    "int4": (0.6, 5e-3, 0.5),
    "w8a8": (0.05, 5e-5, 0.9),
    "w4a8": (0.6, 5e-3, 0.5),
}
# each precision on our CPU kernels where this CPU has them, and on PyTorch's / torchao's
# ("-torch": LLAMA_MIMI_CPU_KERNELS=0), which every other machine uses
ROUTES = ["none"] + [f"{p}{route}" for p in BOUNDS if p != "none" for route in ("", "-torch")]


def tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = llama_mimi_tiny(num_quantizers=Q).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.02)
    return model


def prompt(frames: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, VOCAB.codebook_size, (Q, frames), generator=g)
    return torch.cat([torch.tensor([BOS, VOCAB.audio_start_id]), VOCAB.encode(codes)])


@pytest.fixture(scope="module")
def reference():
    ids = prompt(50)[None]  # 202 tokens
    with torch.no_grad():
        return ids, tiny()(ids).float()


@pytest.fixture(scope="module", params=ROUTES)
def quantized(request):
    """``(precision, model, ours)``: ours is whether the layers run on our CPU kernels."""
    precision = request.param.split("-")[0]
    with pytest.MonkeyPatch.context() as mp:
        if request.param.endswith("-torch"):
            mp.setenv("LLAMA_MIMI_CPU_KERNELS", "0")
        spec = parse_quantize(precision)
        ours = spec.uses_cpu_kernel(CPU)
        model = quantize_model(tiny(), spec, CPU)
    return precision, model, ours


def test_logits_close_to_fp32(quantized, reference):
    precision, model, _ = quantized
    ids, ref = reference
    with torch.no_grad():
        logits = model(ids).float()
    max_diff, max_kl, min_top1 = BOUNDS[precision]
    kl = F.kl_div(logits.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="none")
    assert (logits - ref).abs().max() <= max_diff
    assert kl.sum(-1).mean() <= max_kl
    assert (logits.argmax(-1) == ref.argmax(-1)).float().mean() >= min_top1


def test_weights_are_stored_in_the_precision(quantized):
    precision, model, ours = quantized
    fp32_bytes = weight_bytes_per_token(tiny())
    ratio = weight_bytes_per_token(model) / fp32_bytes
    # the norms stay fp32 (the activations' dtype on a CPU); int8 adds a scale per row, int4 a
    # scale and zero per 128 columns (fp32 in ours, bf16 in torchao's packing)
    assert {
        "none": ratio == 1.0,
        "bf16": 0.50 < ratio < 0.51,
        "int8": 0.25 < ratio < 0.26,
        "w8a8": 0.25 < ratio < 0.26,
        "int4": 0.13 < ratio < 0.14,  # torchao's, bf16 scales and zeros
        "w4a8": 0.14 < ratio < 0.145,
    }[precision], ratio
    assert next(model.tok_embeddings.parameters()).dtype == torch.float32  # on every route
    attn = model.layers[0].attn  # on our kernels q, k and v are one projection (fused_layers)
    q_proj = attn.qkv_proj if ours else attn.q_proj
    if precision == "none":  # the model as loaded, on every machine
        assert not ours and type(q_proj) is nn.Linear and q_proj.weight.dtype == torch.float32
    if precision == "bf16":
        assert type(q_proj) is Bf16Linear and q_proj.weight.dtype == torch.bfloat16
        assert q_proj.cpu_kernel == ours
    if precision in ("int8", "w8a8"):
        assert type(q_proj) is {"int8": Int8Linear, "w8a8": W8A8Linear}[precision]
        assert q_proj.weight_int8.dtype == torch.int8 and q_proj.cpu_kernel == ours
    if precision == "w4a8":
        assert type(q_proj) is W4A8Linear
        assert q_proj.weight_int4.dtype == torch.uint8 and q_proj.cpu_kernel == ours
    if precision == "int4":  # torchao's on every machine, on the inputs rounded to bf16
        assert not ours
        assert type(q_proj) is InBf16
        assert type(q_proj.linear.weight).__name__ == "AffineQuantizedTensor"


def test_generate_batch_equals_single(quantized):
    precision, model, _ = quantized
    prompts = [prompt(1, seed=1), prompt(3, seed=2)]  # different lengths: left padding
    kw = dict(semantic=SamplingParams(1.5, 100), acoustic=SamplingParams(1.0, 50), seed=[3, 4])
    batch = generate(model, prompts, VOCAB, 6, stop_at_end=False, **kw)
    assert batch.num_frames == [6, 6]
    for b in range(2):
        single = generate(
            model, [prompts[b]], VOCAB, 6, stop_at_end=False, **{**kw, "seed": [kw["seed"][b]]}
        )
        assert torch.equal(single.ids[0], batch.ids[b]), precision


@pytest.mark.parametrize("precision", PRECISIONS)
def test_every_precision_runs_eager_and_compiled_without_our_kernels(precision, monkeypatch):
    """The route of a machine without our kernels (LLAMA_MIMI_CPU_KERNELS=0): a decode-sized
    forward (4 positions) and greedy generation, eager and compiled, for every precision; the
    compiled logits equal the eager ones within fp32 rounding (int8: a bf16 rounding), and the
    eager ones are close to fp32.
    (int8 compiled used to fail in inductor's lowering of aten's int8 weight-only matmul.)"""
    monkeypatch.setenv("LLAMA_MIMI_CPU_KERNELS", "0")
    model = quantize_model(tiny(), parse_quantize(precision), CPU)
    assert not any(getattr(m, "cpu_kernel", False) for m in model.modules())
    ids = prompt(1)[None]  # 6 tokens
    torch.compiler.reset()
    with torch.no_grad():
        ref = tiny()(ids).float()
        eager = model(ids).float()
        compiled = torch.compile(model, dynamic=False)(ids).float()
    max_diff, _, min_top1 = BOUNDS[precision]
    assert (eager - ref).abs().max() <= max_diff
    assert (eager.argmax(-1) == ref.argmax(-1)).float().mean() >= min_top1
    # compiled, int8's bf16 matmul and scale round once instead of twice: 0.0076 measured
    atol = 0.02 if precision == "int8" else 1e-4
    torch.testing.assert_close(compiled, eager, rtol=0, atol=atol)  # so, close to fp32 too
    kw = dict(semantic=SamplingParams(0.0, None), acoustic=SamplingParams(0.0, None))
    prompts = [prompt(2, seed=1)]
    torch.compiler.reset()
    a = generate(model, prompts, VOCAB, 3, stop_at_end=False, compile=True, **kw)
    b = generate(model, prompts, VOCAB, 3, stop_at_end=False, **kw)
    assert torch.equal(a.ids[0], b.ids[0]), precision


def test_eval_scores_close_to_fp32(quantized, tokenizer_and_pairs):
    from llama_mimi_tt.evaluation import score_pairs

    precision, model, _ = quantized
    tokenizer, pairs, codes, ref = tokenizer_and_pairs
    got = score_pairs(model, tokenizer, pairs, codes, batch_size=4, progress=False)
    # per-token mean log-probabilities (~ -10); int4's logits move by up to 0.3
    tolerance = {"none": 1e-4, "int4": 0.05, "w4a8": 0.05}.get(precision, 0.01)
    for r, g in zip(ref, got):
        for k in ("score_positive", "score_negative"):
            assert abs(r[k] - g[k]) < tolerance, (precision, k)


# |score with our kernels - score without| per precision (per-token mean log-probabilities,
# about -10; measured: 0 for none, bf16, int8 and int4, 3e-4 for w8a8 and w4a8): none and int4
# run the same code on both routes (PyTorch's, torchao's); bf16 and int8 score with a bf16
# matmul on both; w8a8 and w4a8 differ in the order of fp32 sums
SAME_EVAL = {"none": 0.0, "bf16": 1e-4, "int8": 1e-4, "int4": 0.0, "w8a8": 1e-3, "w4a8": 1e-3}


@pytest.mark.parametrize("precision", PRECISIONS)
def test_the_same_eval_scores_with_and_without_our_kernels(precision, eval_pairs, monkeypatch):
    """An eval scores alike on a machine with our kernels and one without: within SAME_EVAL,
    and the same choice for every pair (all 8 margins here are more than twice that)."""
    from llama_mimi_tt.evaluation import score_pairs

    tokenizer, pairs, codes = eval_pairs
    got = {}
    for switch in ("1", "0"):
        monkeypatch.setenv("LLAMA_MIMI_CPU_KERNELS", switch)
        model = quantize_model(tiny(), parse_quantize(precision), CPU)
        got[switch] = score_pairs(model, tokenizer, pairs, codes, batch_size=3, progress=False)
    on, off = got["1"], got["0"]
    if precision in ("none", "int4"):
        assert on == off  # bitwise: the same model on the same code
    for a, b in zip(on, off):
        for k in ("score_positive", "score_negative"):
            assert abs(a[k] - b[k]) <= SAME_EVAL[precision], (precision, k, a[k] - b[k])
    clear = [
        (a["outcome"], b["outcome"])
        for a, b in zip(on, off)
        if abs(a["score_positive"] - a["score_negative"]) > 2 * SAME_EVAL[precision]
    ]
    assert len(clear) == 8
    assert all(x == y for x, y in clear)


@pytest.fixture(scope="module")
def eval_pairs():
    """8 pairs over 8 random code sequences of 3-13 frames. Scoring runs whole sequences: the
    weight-only layers take F.linear there on both routes, w8a8 and w4a8 our kernels."""
    from llama_mimi_tt.benchmarks import Pair
    from llama_mimi_tt.tokenizer import llama_mimi_tokenizer

    tokenizer = llama_mimi_tokenizer("builtin:byte", num_quantizers=Q)
    g = torch.Generator().manual_seed(1)
    codes = {
        f"{i}.wav": torch.randint(0, 2048, (Q, 3 + i + i % 2 * 3), generator=g) for i in range(8)
    }
    pairs = [Pair("s", "x", f"p{i}", f"{i}.wav", f"{(i + 3) % 8}.wav") for i in range(8)]
    return tokenizer, pairs, codes


@pytest.fixture(scope="module")
def tokenizer_and_pairs():
    from llama_mimi_tt.benchmarks import Pair
    from llama_mimi_tt.evaluation import score_pairs
    from llama_mimi_tt.tokenizer import llama_mimi_tokenizer

    tokenizer = llama_mimi_tokenizer("builtin:byte", num_quantizers=Q)
    g = torch.Generator().manual_seed(0)
    codes = {f"{i}.wav": torch.randint(0, 2048, (Q, 12), generator=g) for i in range(4)}
    pairs = [Pair("s", "x", "p0", "0.wav", "1.wav"), Pair("s", "x", "p1", "2.wav", "3.wav")]
    ref = score_pairs(tiny(), tokenizer, pairs, codes, batch_size=4, progress=False)
    return tokenizer, pairs, codes, ref


# ---- errors ----------------------------------------------------------------------------------
def test_parse_values_and_errors():
    assert parse_quantize(None) == QuantSpec("none", 128)
    assert parse_quantize(None).activation_dtype(CPU) is None  # none never casts
    assert parse_quantize("INT4", "64") == QuantSpec("int4", 64)
    assert "group 64" in parse_quantize("int4", 64).describe(CPU)
    with pytest.raises(UserError, match=r"quantize='fp8'.*none, bf16, int8, int4, w8a8, w4a8"):
        parse_quantize("fp8")
    with pytest.raises(UserError, match=r"quantize='fp32'.*quantize=none dtype=fp32"):
        parse_quantize("fp32")
    with pytest.raises(UserError, match=r"quantize_group_size=100 .*32, 64, 128, 256"):
        parse_quantize("int4", 100)
    with pytest.raises(UserError, match=r"w4a8 takes groups of 128 columns, not .*=64"):
        parse_quantize("w4a8", 64)


def test_unsupported_shapes_and_devices_are_clear_errors():
    model = tiny()
    with pytest.raises(
        UserError, match=r"quantize_group_size=256: layers.0.attn.q_proj has 128 input"
    ):
        quantize_model(model, parse_quantize("int4", 256), CPU)
    with pytest.raises(UserError, match=r"runs on cpu and cuda, not on mps: use quantize=bf16"):
        quantize_model(model, parse_quantize("int8"), torch.device("mps"))
    # nothing was changed by the refusals
    assert next(model.parameters()).dtype == torch.float32

    class Odd(nn.Module):  # 40 output rows: not a multiple of the int4 CPU tile (16)
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(128, 40, bias=False)])

    with pytest.raises(UserError, match=r"40 output features, not a multiple of 16"):
        quantize_model(Odd(), parse_quantize("int4"), CPU)
    assert isinstance(quantize_model(Odd(), parse_quantize("int8"), CPU).layers[0], Int8Linear)


# ---- recipes ---------------------------------------------------------------------------------
def _run_recipe(path: Path, argv, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{path.stem}_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as done:  # torchtune's config.parse exits with the result
        module.recipe_main()
    assert not done.value.code


def test_generate_recipe_reports_the_precision(tmp_path, monkeypatch):
    out = tmp_path / "gen"
    argv = [
        "llama_mimi_generate", "--config", str(ROOT / "configs" / "generate.yaml"),
        f"output_dir={out}", "quantize=int4", "quantize_group_size=64", "max_seconds=0.32",
        "num_samples=1",
    ]  # fmt: skip
    _run_recipe(ROOT / "recipes" / "llama_mimi_generate.py", argv, monkeypatch)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["quantize"] == "int4" and summary["dtype"] == "torch.float32"
    assert summary["precision"] == (
        "int4 (int4 weight-only, group 64; linear inputs and outputs in bf16, fp32 sums; fp32 "
        "activations; torchao Int4CPULayout)"
    )
    assert summary["frames"] == 4


def test_eval_recipe_reports_the_precision(tmp_path, monkeypatch):
    from tests.test_eval import pattern_codes, shuffled, write_codes_wav

    for k in range(2):
        pos = pattern_codes(4 + k, phase=k)
        write_codes_wav(tmp_path / "sSC" / f"{2 * k}_story{k}_correct.wav", pos)
        write_codes_wav(tmp_path / "sSC" / f"{2 * k + 1}_story{k}_incorrect.wav", shuffled(pos, k))
    out = tmp_path / "out"
    argv = [
        "llama_mimi_eval", "--config", str(ROOT / "configs" / "eval.yaml"),
        f"output_dir={out}", f"suites.sstorycloze.path={tmp_path / 'sSC'}",
        "codec._component_=tests.test_eval.FakeCodec", "quantize=int8",
    ]  # fmt: skip
    _run_recipe(ROOT / "recipes" / "llama_mimi_eval.py", argv, monkeypatch)
    results = json.loads((out / "results.json").read_text())
    assert results["precision"].startswith("int8 (int8 weight-only, per-row scales")
    assert results["suites"]["sStoryCloze"]["overall"]["pairs"] == 2

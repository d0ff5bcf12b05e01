"""Our CPU kernels (int8, w4a8, w8a8, bf16 matmuls; the decode attention): the packings
round-trip, each matmul equals the dequantized weight's within its activation rounding, the
int8-activation ones equal the same arithmetic in PyTorch, the attention equals
PyTorch's SDPA over the expanded heads, threads change nothing, bad shapes are clear errors,
torch.compile keeps them in one graph, and weights land in huge pages."""

import mmap

import pytest
import torch
import torch.nn.functional as F

from llama_mimi_tt import cpu_kernels

needs = {
    kind: pytest.mark.skipif(
        not cpu_kernels.available(kind), reason=f"this CPU or machine cannot run the {kind} kernel"
    )
    for kind in cpu_kernels.KERNELS
}


def weight(n=48, k=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * 0.02


def packed(kind, w):
    """``(call, dequantized weight)`` of ``w`` in the kernel ``kind``'s format."""
    if kind == "w4a8":
        p = cpu_kernels.pack_int4(w)
        return (lambda x: cpu_kernels.w4a8_matmul(x, *p)), cpu_kernels.unpack_int4(*p)
    if kind == "int8":  # the sums without the scales
        q, scales = cpu_kernels.pack_int8(w)
        return (lambda x: cpu_kernels.int8_matmul(x, q) * scales), q.float() * scales[:, None]
    if kind == "w8a8":
        q, scales = cpu_kernels.pack_int8(w)
        return (lambda x: cpu_kernels.w8a8_matmul(x, q, scales)), q.float() * scales[:, None]
    b = w.to(torch.bfloat16)
    return (lambda x: cpu_kernels.bf16_matmul(x, b)), b.float()


def test_int4_packing_round_trips_within_half_a_step():
    w = weight()
    p, scales, zeros = cpu_kernels.pack_int4(w)
    assert p.dtype == torch.uint8 and p.shape == (48, 128)
    assert scales.shape == zeros.shape == (48, 2)
    back = cpu_kernels.unpack_int4(p, scales, zeros)
    step = scales.repeat_interleave(cpu_kernels.GROUP_SIZE, dim=1)
    assert ((back - w).abs() <= step / 2 + 1e-7).all()
    # the column order inside a group: byte j holds columns j and 64 + j
    q = torch.round(w[0, :128] / scales[0, 0] + zeros[0, 0]).clamp(0, 15).to(torch.uint8)
    assert torch.equal(p[0, :64], q[:64] | (q[64:] << 4))


def test_int8_packing_round_trips_within_half_a_step():
    w = weight()
    q, scales = cpu_kernels.pack_int8(w)
    assert q.dtype == torch.int8 and q.shape == (48, 256) and scales.shape == (48,)
    assert int(q.abs().max()) == 127  # each row's largest weight maps to +-127
    assert ((q.float() * scales[:, None] - w).abs() <= scales[:, None] / 2 + 1e-7).all()


# relative error against the dequantized weight: none but the order of fp32 sums (int8), int8
# activations per group of 128 (w4a8, w8a8; about 0.6% measured) or bf16 activations (bf16;
# about 0.3%)
TOLERANCE = {"int8": 1e-6, "w4a8": 0.02, "w8a8": 0.02, "bf16": 0.01}
KINDS = list(TOLERANCE)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("m", [1, 3])
def test_matmul_equals_the_dequantized_weight(kind, m):
    if not cpu_kernels.available(kind):
        pytest.skip(f"this CPU or machine cannot run the {kind} kernel")
    call, dense = packed(kind, weight())
    x = torch.randn(m, 256, generator=torch.Generator().manual_seed(1))
    x[0, :128] = 0.0  # an all-zero group of activations
    for inp in (x, x.to(torch.bfloat16)):
        ref = inp.float() @ dense.T  # the exact product of what the kernel was given
        y = call(inp)
        assert y.shape == (m, 48) and y.dtype == torch.float32 and torch.isfinite(y).all()
        rel = (y - ref).norm() / ref.norm()
        assert rel < TOLERANCE[kind], float(rel)


@pytest.mark.parametrize("kind", KINDS)
def test_threads_do_not_change_the_result(kind):
    if not cpu_kernels.available(kind):
        pytest.skip(f"this CPU or machine cannot run the {kind} kernel")
    call, _ = packed(kind, weight(n=512, k=1024, seed=2))
    x = torch.randn(2, 1024, generator=torch.Generator().manual_seed(3))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = call(x)
        torch.set_num_threads(2)
        two = call(x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


@pytest.mark.parametrize("kind", ["w4a8", "w8a8"])
def test_int8_activation_kernels_equal_their_pytorch_arithmetic(kind):
    """The kernels and quantize's PyTorch route quantize the activations alike and sum the same
    integer products: they differ only in the order of the fp32 sums of scaled terms."""
    from llama_mimi_tt.quantize import W4A8Linear, W8A8Linear

    if not cpu_kernels.available(kind):
        pytest.skip(f"this CPU or machine cannot run the {kind} kernel")
    layer = {"w4a8": W4A8Linear, "w8a8": W8A8Linear}[kind](weight(n=64, k=512, seed=7))
    x = torch.randn(5, 512, generator=torch.Generator().manual_seed(8))
    x[1, 128:256] = 0.0  # an all-zero group
    x[2, :128] *= 100.0  # a group with a large scale beside small ones
    ours = layer(x)
    layer.cpu_kernel = False
    torch.testing.assert_close(ours, layer(x), rtol=1e-5, atol=1e-5)


@needs["w4a8"]
@needs["bf16"]
def test_a_bad_shape_is_refused():
    p = cpu_kernels.pack_int4(weight())
    with pytest.raises(ValueError, match=r"x has shape \(1, 200\); the w4a8 weight has 256"):
        cpu_kernels.w4a8_matmul(torch.randn(1, 200), *p)
    q, scales = cpu_kernels.pack_int8(weight(k=200 + 56))
    with pytest.raises(ValueError, match=r"x has shape \(1, 128\); the int8 weight has 256"):
        cpu_kernels.int8_matmul(torch.randn(1, 128), q)
    with pytest.raises(ValueError, match="needs a bf16 weight, not torch.float32"):
        cpu_kernels.bf16_matmul(torch.randn(1, 256), weight())
    # a weight moved off the CPU after quantizing (the op itself would take the meta path)
    with pytest.raises(ValueError, match="takes CPU tensors, not cpu and meta: quantize the model"):
        cpu_kernels._run("int8_matmul", torch.randn(1, 256), q.to("meta"), 256, scales)


@needs["w8a8"]
@needs["bf16"]
def test_compiled_layers_keep_the_kernels_in_one_graph():
    from llama_mimi_tt.quantize import Bf16Linear, Int8Linear, W4A8Linear, W8A8Linear

    w = weight(n=256, k=256)
    layers = torch.nn.Sequential(
        Int8Linear(w), W4A8Linear(w), W8A8Linear(w), Bf16Linear.of(w)
    ).eval()
    assert all(layer.cpu_kernel for layer in layers)
    x = torch.randn(1, 1, 256, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        eager = layers(x)
        compiled = torch.compile(layers, fullgraph=True)(x)  # a graph break would raise
    assert compiled.shape == (1, 1, 256)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


def sdpa_reference(q, k, v, valid):
    """torchtune's decode attention: key/value heads expanded to the query heads, then SDPA."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=valid[:, None, None])[
        :, :, 0
    ]


@needs["attention"]
@pytest.mark.parametrize(
    "b, heads, kv_heads, length, dim",
    [(1, 32, 8, 150, 64), (3, 4, 2, 37, 32), (2, 8, 8, 300, 128), (2, 6, 2, 5, 16)],
)
def test_decode_attention_equals_sdpa_over_the_expanded_heads(b, heads, kv_heads, length, dim):
    g = torch.Generator().manual_seed(length)
    q = torch.randn(b, heads, dim, generator=g) * 2  # scores of +-20: the softmax is peaked
    k = torch.randn(b, kv_heads, length, dim, generator=g)
    v = torch.randn(b, kv_heads, length, dim, generator=g)
    valid = torch.rand(b, length, generator=g) > 0.3  # holes, as left padding makes
    valid[:, 0] = True
    valid[0, length // 2 :] = False  # the cache's unfilled tail
    out = cpu_kernels.decode_attention(q, k, v, valid, dim**-0.5)
    assert out.shape == (b, heads, dim) and out.dtype == torch.float32
    torch.testing.assert_close(out, sdpa_reference(q, k, v, valid), rtol=1e-5, atol=2e-6)
    # what lies in the invalid positions is never read into the result
    k2, v2 = k.clone(), v.clone()
    k2[~valid[:, None, :].expand_as(k[..., 0])] = float("nan")
    v2[~valid[:, None, :].expand_as(v[..., 0])] = 1e30
    assert torch.equal(cpu_kernels.decode_attention(q, k2, v2, valid, dim**-0.5), out)


@needs["attention"]
def test_decode_attention_threads_and_empty_rows():
    g = torch.Generator().manual_seed(5)
    q, k, v = torch.randn(2, 8, 64, generator=g), *torch.randn(2, 2, 2, 64, 64, generator=g)
    valid = torch.ones(2, 64, dtype=torch.bool)
    valid[1] = False  # no position to attend to: zeros, not NaN
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_kernels.decode_attention(q, k, v, valid, 0.125)
        torch.set_num_threads(2)
        two = cpu_kernels.decode_attention(q, k, v, valid, 0.125)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    assert torch.equal(one[1], torch.zeros(8, 64))


@needs["attention"]
def test_decode_attention_refuses_what_it_cannot_compute():
    q, k, valid = (
        torch.randn(1, 4, 24),
        torch.randn(1, 2, 8, 24),
        torch.ones(1, 8, dtype=torch.bool),
    )
    with pytest.raises(ValueError, match="head size that is a multiple of 16"):
        cpu_kernels.decode_attention(q, k, k, valid, 1.0)
    q, k = torch.randn(1, 4, 32), torch.randn(1, 2, 8, 32)
    with pytest.raises(ValueError, match="float32 CPU tensors"):
        cpu_kernels.decode_attention(q.bfloat16(), k, k, valid, 1.0)
    with pytest.raises(ValueError, match=r"valid must be bool \(1, 8\)"):
        cpu_kernels.decode_attention(q, k, k, valid[:, :4], 1.0)
    with pytest.raises(ValueError, match="does not match"):
        cpu_kernels.decode_attention(q, k, k[..., :16], valid, 1.0)


@needs["attention"]
def test_rms_norm_and_rope_equal_torchtunes():
    from torchtune.models.llama3_1 import Llama3ScaledRoPE
    from torchtune.modules import RMSNorm

    g = torch.Generator().manual_seed(6)
    norm = RMSNorm(256, eps=1e-5)
    norm.scale.data = torch.randn(256, generator=g)
    x = torch.randn(3, 1, 256, generator=g) * 4
    torch.testing.assert_close(cpu_kernels.rms_norm(x, norm.scale, 1e-5), norm(x))
    with pytest.raises(ValueError, match="a width that is a multiple of 16, not 40"):
        cpu_kernels.rms_norm(torch.randn(1, 40), torch.ones(40), 1e-5)
    rope = Llama3ScaledRoPE(64, max_seq_len=300, base=500_000, scale_factor=32)
    qkv = torch.randn(2, 3, 12 * 64, generator=g)
    qk = qkv[..., : 10 * 64].view(2, 3, 10, 64)  # q and k heads of a fused projection: strided
    pos = torch.tensor([[0, 1, 2], [250, 251, 299]])
    torch.testing.assert_close(cpu_kernels.rope(qk, rope.cache, pos), rope(qk, input_pos=pos))
    with pytest.raises(ValueError, match=r"a position outside 0..299"):
        cpu_kernels.rope(qk, rope.cache, pos + 1)


def test_huge_page_copies_hold_the_same_values():
    small = torch.arange(10.0)
    assert cpu_kernels.in_huge_pages(small) is small  # under 2 MB: left as it is
    t = torch.randn(1024, 1024)  # 4 MB
    h = cpu_kernels.in_huge_pages(t)
    assert torch.equal(h, t) and h.data_ptr() != t.data_ptr() and h.is_contiguous()
    if hasattr(mmap, "MADV_HUGEPAGE"):
        assert h.data_ptr() % mmap.PAGESIZE == 0  # its own anonymous mapping


def test_the_switch_turns_every_kernel_off_at_the_next_call(monkeypatch):
    on = {kind: cpu_kernels.available(kind) for kind in cpu_kernels.KERNELS}
    monkeypatch.setenv("LLAMA_MIMI_CPU_KERNELS", "0")
    assert not any(cpu_kernels.available(kind) for kind in cpu_kernels.KERNELS)
    monkeypatch.setenv("LLAMA_MIMI_CPU_KERNELS", "1")
    assert {kind: cpu_kernels.available(kind) for kind in cpu_kernels.KERNELS} == on


@needs["int8"]
def test_an_unusable_cache_folder_falls_back_with_one_logged_line(tmp_path, monkeypatch, caplog):
    from llama_mimi_tt.quantize import parse_quantize

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # the kernels cannot be built under it
    cpu_kernels._library.cache_clear()
    try:
        with caplog.at_level("WARNING"):
            assert not cpu_kernels.available("int8")
            for precision in ("bf16", "int8", "w8a8", "w4a8"):
                assert not parse_quantize(precision).uses_cpu_kernel(torch.device("cpu"))
            cpu_kernels._library.cache_clear()  # a second attempt fails the same way, unsaid
            assert not cpu_kernels.available("int8")
    finally:
        monkeypatch.undo()
        cpu_kernels._library.cache_clear()
    said = [r.getMessage() for r in caplog.records if str(blocker) in r.getMessage()]
    assert len(said) == 3, said  # one line for each library: avx512f, vnni, bf16
    assert said[0].startswith("our avx512f CPU kernels (int8, attention) are off: building")
    assert cpu_kernels.available("int8")
    # a fresh cache folder: built under a temporary name and renamed, nothing else left there
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "fresh"))
    cpu_kernels._library.cache_clear()
    try:
        assert cpu_kernels.available("int8")
        built = [p.name for p in (tmp_path / "fresh" / "llama_mimi_tt").iterdir()]
        assert len(built) == 1 and built[0].startswith("cpu_kernels-avx512f-"), built
    finally:
        monkeypatch.undo()
        cpu_kernels._library.cache_clear()


@needs["int8"]
def test_without_gcc_the_kernels_fall_back_with_one_logged_line(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # nothing built there yet
    monkeypatch.setenv("PATH", str(tmp_path))  # and no gcc to build it
    cpu_kernels._library.cache_clear()
    try:
        with caplog.at_level("WARNING"):
            assert not any(cpu_kernels.available(kind) for kind in cpu_kernels.KERNELS)
    finally:
        monkeypatch.undo()
        cpu_kernels._library.cache_clear()
    said = [r.getMessage() for r in caplog.records if "gcc is not installed" in r.getMessage()]
    assert len(said) == 1 and str(tmp_path) in said[0], said
    assert cpu_kernels.available("int8")


def test_each_library_is_built_for_its_own_instructions_only():
    """No global -mavx512 flag: a library holds only the functions of its instruction set, so a
    CPU or a gcc without VNNI or BF16 keeps the others; each kernel is in exactly one."""
    assert not [flag for flag in cpu_kernels.GCC_FLAGS if flag.startswith("-m")]
    source = cpu_kernels.SOURCE.read_text()
    assert "-mavx512" not in source
    functions = [f for _, fs in cpu_kernels.KERNELS.values() for f in fs]
    assert len(functions) == len(set(functions))
    for library in cpu_kernels.LIBRARIES:
        so = cpu_kernels._library(library)
        if so is None or not set(cpu_kernels.LIBRARIES[library][1]) <= cpu_kernels._cpu_flags():
            continue
        for kernel, (home, names) in cpu_kernels.KERNELS.items():
            assert all(hasattr(so, name) == (home == library) for name in names), kernel

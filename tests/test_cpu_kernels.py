"""Our int4 CPU kernel: the packing round-trips within half a quantization step, the matmul
equals the dequantized weight's within the int8 activation rounding, and threads change nothing."""

import pytest
import torch

from llama_mimi_tt import cpu_kernels

pytestmark = pytest.mark.skipif(
    not cpu_kernels.available(), reason="the CPU has no AVX-512 VNNI (or gcc is missing)"
)


def weight(n=48, k=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * 0.02


def test_packing_round_trips_within_half_a_step():
    w = weight()
    packed, scales, zeros = cpu_kernels.pack_int4(w)
    assert packed.dtype == torch.uint8 and packed.shape == (48, 128)
    assert scales.shape == zeros.shape == (48, 2)
    back = cpu_kernels.unpack_int4(packed, scales, zeros)
    step = scales.repeat_interleave(cpu_kernels.GROUP_SIZE, dim=1)
    assert ((back - w).abs() <= step / 2 + 1e-7).all()
    # the column order inside a group: byte j holds columns j and 64 + j
    q = torch.round(w[0, :128] / scales[0, 0] + zeros[0, 0]).clamp(0, 15).to(torch.uint8)
    assert torch.equal(packed[0, :64], q[:64] | (q[64:] << 4))


@pytest.mark.parametrize("m", [1, 3])
def test_matmul_equals_the_dequantized_weight(m):
    w = weight()
    packed, scales, zeros = cpu_kernels.pack_int4(w)
    x = torch.randn(m, 256, generator=torch.Generator().manual_seed(1))
    x[0, :128] = 0.0  # an all-zero group of activations
    ref = x @ cpu_kernels.unpack_int4(packed, scales, zeros).T
    for inp in (x, x.to(torch.bfloat16)):
        y = cpu_kernels.int4_matmul(inp, packed, scales, zeros)
        assert y.shape == (m, 48) and torch.isfinite(y).all()
        rel = (y - ref).norm() / ref.norm()
        assert rel < 0.02, float(rel)  # int8 activations: about 0.6% here


def test_threads_do_not_change_the_result():
    w = weight(n=512, k=1024, seed=2)
    packed, scales, zeros = cpu_kernels.pack_int4(w)
    x = torch.randn(2, 1024, generator=torch.Generator().manual_seed(3))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_kernels.int4_matmul(x, packed, scales, zeros)
        torch.set_num_threads(2)
        two = cpu_kernels.int4_matmul(x, packed, scales, zeros)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_a_bad_shape_is_refused():
    packed, scales, zeros = cpu_kernels.pack_int4(weight())
    with pytest.raises(ValueError, match="x has 200 columns; the int4 weight has 256"):
        cpu_kernels.int4_matmul(torch.randn(1, 200), packed, scales, zeros)


def test_an_unusable_cache_folder_falls_back_to_torchao(tmp_path, monkeypatch):
    from llama_mimi_tt.quantize import parse_quantize

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # the kernel cannot be built under it
    cpu_kernels._library.cache_clear()
    try:
        assert not cpu_kernels.available()
        assert not parse_quantize("int4").uses_cpu_kernel(torch.device("cpu"))
    finally:
        monkeypatch.undo()
        cpu_kernels._library.cache_clear()
    assert cpu_kernels.available()

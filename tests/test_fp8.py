"""FP8 experts on the CPU (docs/spec.md "FP8 experts"): block quantization bytes and scales, the
forward against the float64 reference, bad inputs."""
import dataclasses

import ml_dtypes
import numpy as np
import pytest

import zeromoe_cupy as zm
from zeromoe_cupy import quant
from zeromoe_cupy.reference import relative_error

from helpers import random_layer_weights, random_x

F8 = ml_dtypes.float8_e4m3fn
FP8_TOL = 5e-3


def _spec_blocks(W):
    """SPEC's block math written out block by block: (q bytes, scale_inv) of one [N, K]."""
    W = np.asarray(W, np.float32)
    N, K = W.shape
    nb, kb = -(-N // 128), -(-K // 128)
    q = np.zeros((N, K), np.uint8)
    s = np.zeros((nb, kb), np.float32)
    for i in range(nb):
        for j in range(kb):
            blk = W[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
            si = np.float32(np.max(np.abs(blk))) / np.float32(448)
            if si == 0:
                si = np.float32(1)
            s[i, j] = si
            v = np.clip(blk / si, -448, 448).astype(F8)
            q[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = v.view(np.uint8)
    return q, s


def test_e4m3_rounds_to_nearest_even_and_saturates():
    v = np.array([17, 19, 464, 500, 1e6, -1e6, np.inf, -np.inf, 2.0 ** -10, 3 * 2.0 ** -10,
                  0.0], np.float32)
    got = quant.e4m3_from_f32(v).astype(np.float32)
    np.testing.assert_array_equal(got, [16, 20, 448, 448, 448, -448, 448, -448, 0,
                                        2.0 ** -8, 0])
    assert np.isnan(quant.e4m3_from_f32(np.float32(np.nan)).astype(np.float32))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("I,H", [(128, 256), (136, 200), (300, 130)])
def test_quantize_weight_equals_spec_block_math(I, H, dtype, rng):
    dt = np.dtype(getattr(ml_dtypes, dtype, None) or dtype)
    w13 = (rng.standard_normal((2, 2 * I, H)) * 0.05).astype(np.float32)
    w13[0, :128, :128] = 0                       # a zero block
    w13[1, I:I + 128, 128:] = 1e-44              # a block whose max / 448 underflows
    w13[1, 5, 7] = 3e4                           # a large value: q must saturate to 448 there
    w13 = w13.astype(dt)
    before = w13.copy()
    q, s = quant.quantize_weight(w13, glu=True)
    np.testing.assert_array_equal(w13.view(np.uint8), before.view(np.uint8))
    assert q.dtype == F8 and q.shape == w13.shape
    assert s.dtype == np.float32 and s.shape == (2, 2 * (-(-I // 128)), -(-H // 128))
    for e in range(2):
        qg, sg = _spec_blocks(w13[e, :I])
        qu, su = _spec_blocks(w13[e, I:])
        np.testing.assert_array_equal(q[e].view(np.uint8), np.concatenate([qg, qu]))
        np.testing.assert_array_equal(s[e], np.concatenate([sg, su]))
    assert s[0, 0, 0] == 1 and s[1, -(-I // 128), 1] == 1
    assert q[1, 5, 7].astype(np.float32) == 448
    # Dequantized: q * scale_inv of its block, exactly.
    d = quant.dequantize_weight(q, s, glu=True)
    for e in range(2):
        for half, rows in ((0, slice(0, I)), (1, slice(I, 2 * I))):
            full = np.repeat(np.repeat(s[e, half * (-(-I // 128)):(half + 1) * (-(-I // 128))],
                                       128, 0), 128, 1)[:I, :H]
            np.testing.assert_array_equal(d[e, rows], q[e, rows].astype(np.float32) * full)


def test_e4m3_decoding_of_every_byte_and_dequantized_dtypes(rng):
    # every one of the 256 e4m3 bytes (NaN's included) decodes as ml_dtypes casts it
    b = np.arange(256, dtype=np.uint8)
    np.testing.assert_array_equal(quant.e4m3_to_f32(b), b.view(F8).astype(np.float32))
    # the dequantized weight in another dtype is the fp32 product rounded once
    q, s = quant.quantize_weight((rng.standard_normal((3, 200, 300)) * 0.1).astype(np.float32))
    d32 = quant.dequantize_weight(q, s)
    for dt in (ml_dtypes.bfloat16, np.float16):
        d = quant.dequantize_weight(q.view(np.uint8), s, dtype=dt)
        assert d.dtype == dt and d.shape == q.shape
        np.testing.assert_array_equal(d.astype(np.float32), d32.astype(dt).astype(np.float32))


def test_quantize_refuses_non_finite_weights():
    w = np.ones((1, 4, 8), np.float32)
    w[0, 1, 2] = np.nan
    with pytest.raises(ValueError, match="finite"):
        quant.quantize_weight(w)


def test_activation_quantization_matches_spec(rng):
    a = rng.standard_normal((3, 300)).astype(np.float32) * 3
    a[1, 128:256] = 0  # an all-zero group: sa = 1e-10 / 448, q = 0
    q, sa = quant.quantize_activations(a)
    for r in range(3):
        for g in range(3):
            grp = a[r, g * 128:(g + 1) * 128]
            want = np.float32(max(np.max(np.abs(grp)), np.float32(1e-10))) / np.float32(448)
            assert sa[r, g] == want
            np.testing.assert_array_equal(q[r, g * 128:(g + 1) * 128].view(np.uint8),
                                          np.clip(grp / want, -448, 448).astype(F8)
                                          .view(np.uint8))


SHAPES = {"aligned": (256, 128), "ragged": (200, 136)}


def _fp8_pair(rng, dtype, shape, zero_type="identity", E=6, Z=3):
    H, I = SHAPES[shape]
    cfg = zm.MoEConfig(hidden_size=H, intermediate_size=I, num_experts=E, num_zero_experts=Z,
                       zero_expert_type=zero_type, top_k=4, dtype=dtype,
                       use_correction_bias=True)
    layer = zm.ZeroExpertMoE.from_weights(cfg, **random_layer_weights(rng, cfg))
    return layer, layer.quantize("fp8")


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("zero_type", ["identity", "zero", "constant"])
def test_fp8_forward_matches_reference(dtype, shape, zero_type, rng):
    layer, l8 = _fp8_pair(rng, dtype, shape, zero_type)
    x = random_x(rng, 12, layer.config.hidden_size, dtype)
    x0 = x.copy()
    y = l8(x)
    np.testing.assert_array_equal(x, x0)
    assert y.dtype == x.dtype and y.shape == x.shape
    ref, _ = l8.reference(x)
    err = relative_error(y, ref)
    ref_unq, _ = layer.reference(x)
    err_unq = relative_error(y, ref_unq)
    print(f"fp8 {dtype} {shape} {zero_type}: vs fp8 reference {err:.2e}, "
          f"vs unquantized reference {err_unq:.2e}")
    assert err <= FP8_TOL
    # The quantization's own error is real (a few percent) and larger than the fp8 math's.
    assert err_unq > err


def test_fp8_layer_from_given_bytes_and_scales(rng):
    """from_weights over e4m3 bytes and scales that no quantize call made."""
    H, I, E = 256, 128, 3
    cfg = zm.MoEConfig(hidden_size=H, intermediate_size=I, num_experts=E, num_zero_experts=1,
                       top_k=2, dtype="bfloat16", quantization="fp8")
    w = random_layer_weights(rng, dataclasses.replace(cfg, quantization=None))
    q13 = np.clip(rng.standard_normal((E, 2 * I, H)) * 100, -448, 448).astype(np.float32) \
        .astype(F8)
    q2 = np.clip(rng.standard_normal((E, H, I)) * 100, -448, 448).astype(np.float32).astype(F8)
    s13 = (rng.random((E, 2, 2)) * 1e-4 + 1e-5).astype(np.float32)
    s2 = (rng.random((E, 2, 1)) * 1e-4 + 1e-5).astype(np.float32)
    kw = dict(router_weight=w["router_weight"])
    layer = zm.ZeroExpertMoE.from_weights(cfg, w13=q13, w2=q2, w13_scale_inv=s13,
                                          w2_scale_inv=s2, **kw)
    bits = zm.ZeroExpertMoE.from_weights(cfg, w13=q13.view(np.uint8), w2=q2.view(np.uint8),
                                         w13_scale_inv=s13, w2_scale_inv=s2, **kw)
    x = random_x(rng, 9, H, "bfloat16")
    y = layer(x)
    ref, _ = layer.reference(x)
    assert relative_error(y, ref) <= FP8_TOL
    np.testing.assert_array_equal(bits(x).view(np.uint16), y.view(np.uint16))
    assert layer.w13.dtype == F8 and bits.w13.dtype == F8
    # scales no quantization makes (NaN, infinite, negative) are refused, naming the scale and
    # its block, in from_weights and when assigned; zero (an all-zero block) is a scale
    for bad in (np.nan, np.inf, -1e-5):
        s = s13.copy()
        s[2, 1, 0] = bad
        with pytest.raises(ValueError, match=r"w13_scale_inv: expected finite block scales "
                                             r">= 0, got .* at block \(2, 1, 0\)"):
            zm.ZeroExpertMoE.from_weights(cfg, w13=q13, w2=q2, w13_scale_inv=s,
                                          w2_scale_inv=s2, **kw)
        with pytest.raises(ValueError, match="w13_scale_inv: expected finite block scales"):
            layer.w13_scale_inv = s
    s = s2.copy()
    s[0] = 0
    layer.w2_scale_inv = s


def test_fp8_random_init_and_no_input_modified(rng):
    cfg = zm.MoEConfig(hidden_size=128, intermediate_size=128, num_experts=2, top_k=1,
                       dtype="float32", quantization="fp8")
    layer = zm.ZeroExpertMoE(cfg, device="cpu", seed=3)
    assert layer.w13.dtype == F8 and layer.w13_scale_inv.shape == (2, 2, 1)
    base = zm.ZeroExpertMoE.from_weights(
        dataclasses.replace(cfg, quantization=None),
        **random_layer_weights(rng, dataclasses.replace(cfg, quantization=None)))
    w13 = base.w13.copy()
    q = base.quantize("fp8")
    np.testing.assert_array_equal(base.w13, w13)
    assert base.config.quantization is None and q.config.quantization == "fp8"
    assert q.router_weight is not base.router_weight


def test_fp8_bad_inputs(rng):
    H, I, E = 128, 128, 2
    cfg = zm.MoEConfig(hidden_size=H, intermediate_size=I, num_experts=E, top_k=1,
                       dtype="bfloat16")
    cfg8 = dataclasses.replace(cfg, quantization="fp8")
    w = random_layer_weights(rng, cfg)
    layer8 = zm.ZeroExpertMoE.from_weights(cfg, **w).quantize("fp8")
    q13, q2, s13, s2 = layer8.w13, layer8.w2, layer8.w13_scale_inv, layer8.w2_scale_inv
    r = w["router_weight"]
    # e4m3 weights with an unquantized config (and the reverse): an error naming the weight.
    with pytest.raises((TypeError, ValueError), match="w13.*quantize"):
        zm.ZeroExpertMoE.from_weights(cfg, r, q13, w["w2"])
    with pytest.raises((TypeError, ValueError), match="w2.*quantize"):
        zm.ZeroExpertMoE.from_weights(cfg, r, w["w13"], q2.view(np.uint8))
    with pytest.raises((TypeError, ValueError), match="w13.*quantize"):
        zm.ZeroExpertMoE.from_weights(cfg8, r, w["w13"], w["w2"], w13_scale_inv=s13,
                                      w2_scale_inv=s2)
    # Missing or misshapen scales.
    with pytest.raises(ValueError, match="w13_scale_inv"):
        zm.ZeroExpertMoE.from_weights(cfg8, r, q13, q2, w2_scale_inv=s2)
    with pytest.raises(ValueError, match="w2_scale_inv"):
        zm.ZeroExpertMoE.from_weights(cfg8, r, q13, q2, w13_scale_inv=s13)
    with pytest.raises(ValueError, match="w13_scale_inv"):
        zm.ZeroExpertMoE.from_weights(cfg8, r, q13, q2, w13_scale_inv=s13[:, :1],
                                      w2_scale_inv=s2)
    with pytest.raises(ValueError, match="w2_scale_inv"):
        zm.ZeroExpertMoE.from_weights(cfg8, r, q13, q2, w13_scale_inv=s13,
                                      w2_scale_inv=np.ones((E, 2, 1), np.float32))
    with pytest.raises(ValueError, match="w13_scale_inv"):
        zm.ZeroExpertMoE.from_weights(cfg, r, w["w13"], w["w2"], w13_scale_inv=s13)
    with pytest.raises(TypeError, match="w2_scale_inv"):
        zm.ZeroExpertMoE.from_weights(cfg8, r, q13, q2, w13_scale_inv=s13,
                                      w2_scale_inv=s2.astype(np.int32))
    with pytest.raises(ValueError, match="quantization"):
        zm.MoEConfig(hidden_size=H, intermediate_size=I, num_experts=E, quantization="int8")
    with pytest.raises(ValueError, match="method"):
        zm.ZeroExpertMoE.from_weights(cfg, **w).quantize("int8")
    for bad in (None, 8, b"fp8"):  # not a string: the wrong kind
        with pytest.raises(TypeError, match="method"):
            zm.ZeroExpertMoE.from_weights(cfg, **w).quantize(bad)
    with pytest.raises(ValueError, match="already quantized"):
        layer8.quantize("fp8")


def test_torch_float8_weights_through_dlpack(rng):
    torch = pytest.importorskip("torch")
    cfg = zm.MoEConfig(hidden_size=128, intermediate_size=128, num_experts=2, top_k=1,
                       dtype="bfloat16")
    layer8 = zm.ZeroExpertMoE.from_weights(cfg, **random_layer_weights(rng, cfg)).quantize("fp8")
    t13 = torch.from_numpy(layer8.w13.view(np.uint8).copy()).view(torch.float8_e4m3fn)
    t2 = torch.from_numpy(layer8.w2.view(np.uint8).copy()).view(torch.float8_e4m3fn)
    again = zm.ZeroExpertMoE.from_weights(layer8.config, layer8.router_weight, t13, t2,
                                          w13_scale_inv=layer8.w13_scale_inv,
                                          w2_scale_inv=layer8.w2_scale_inv)
    np.testing.assert_array_equal(again.w13.view(np.uint8), layer8.w13.view(np.uint8))


def test_fp8_layer_save_load_and_pickle(tmp_path, rng):
    import pickle
    cfg = zm.MoEConfig(hidden_size=200, intermediate_size=136, num_experts=3,
                       num_zero_experts=1, top_k=2, dtype="bfloat16")
    l8 = zm.ZeroExpertMoE.from_weights(cfg, **random_layer_weights(rng, cfg)).quantize("fp8")
    x = random_x(rng, 5, 200, "bfloat16")
    y = l8(x)
    l8.save(tmp_path / "l8.safetensors")
    for again in (zm.ZeroExpertMoE.load(tmp_path / "l8.safetensors", device="cpu"),
                  pickle.loads(pickle.dumps(l8))):
        assert again.config.quantization == "fp8" and again.w13.dtype == F8
        np.testing.assert_array_equal(again.w13_scale_inv, l8.w13_scale_inv)
        np.testing.assert_array_equal(again(x).view(np.uint16), y.view(np.uint16))


@pytest.mark.parametrize("kb", [1, 2, 3, 4, 5, 8])
def test_lt_weight_scales_layouts(kb):
    """The weight scales as the padded FP8 path hands them to cuBLASLt (the GPU self-check
    takes them from the same function): rows padded with zeros to a multiple of 4 scales, the
    values in place; or transposed."""
    from zeromoe_cupy.experts.fp8 import _lt_weight_scales
    s = np.random.default_rng(kb).uniform(0.5, 2.0, (3, 5, kb)).astype(np.float32)
    padded = _lt_weight_scales(s, False)
    assert padded.flags.c_contiguous and padded.dtype == np.float32
    assert padded.shape == (3, 5, -(-kb // 4) * 4)
    np.testing.assert_array_equal(padded[..., :kb], s)
    assert not padded[..., kb:].any()
    transposed = _lt_weight_scales(s, True)
    assert transposed.flags.c_contiguous and transposed.shape == (3, kb, 5)
    np.testing.assert_array_equal(transposed, s.transpose(0, 2, 1))
    np.testing.assert_array_equal(_lt_weight_scales(s[0], False)[:, :kb], s[0])  # 2-d too


@pytest.mark.parametrize("rows,K", [(1, 6144), (12, 2048), (768, 2048), (12288, 6144),
                                    (196608, 6144), (3, 130)])
def test_quantize_grid_covers_every_group_within_the_block_cap(rows, K):
    """quantize_rows' grid: 4 rows per block, every 128-feature group reached (y between
    ceil(groups / 8) and groups: a warp takes groups y apart), one warp per group while that
    stays within QUANTIZE_MAX_BLOCKS blocks (few rows: no chain of groups per warp)."""
    from zeromoe_cupy.experts import fp8 as fp8_path
    x, y = fp8_path._quantize_grid(rows, K)
    groups = -(-K // 128)
    assert x == -(-rows // 4) and -(-groups // 8) <= y <= groups
    if x * groups <= fp8_path.QUANTIZE_MAX_BLOCKS:
        assert y == groups
    else:
        assert x * y <= fp8_path.QUANTIZE_MAX_BLOCKS or y == -(-groups // 8)


@pytest.mark.parametrize("cc,inexact_ok,serves", [("90", False, False), ("90", True, True),
                                                  ("89", False, True), ("120", False, True),
                                                  ("100", False, True), ("80", True, False)])
def test_cublaslt_policy_by_compute_capability(cc, inexact_ok, serves, monkeypatch):
    """Whether cuBLASLt's block-scaled FP8 GEMM may serve (before its per-shape self-check):
    never on 9.x unless LT_INEXACT_SUMS (its sums there took layers past SPEC's 5e-3), never
    without FP8 tensor cores (< 8.9: LT_REFUSAL says so), never for H or I not multiples
    of 128. A stand-in for CuPy gives the compute capability."""
    from types import SimpleNamespace

    from zeromoe_cupy.experts import fp8 as fp8_path
    fake = SimpleNamespace(cuda=SimpleNamespace(Device=lambda: SimpleNamespace(
        compute_capability=cc)))
    monkeypatch.setattr(fp8_path, "cupy_module", lambda: fake)
    monkeypatch.setattr(fp8_path, "LT_REFUSAL", None)
    monkeypatch.setattr(fp8_path, "LT_INEXACT_SUMS", inexact_ok)
    assert fp8_path._lt_may_serve(256, 1024) is serves
    assert (fp8_path.LT_REFUSAL is not None) == (cc == "80")
    monkeypatch.setattr(fp8_path, "LT_REFUSAL", None)
    assert not fp8_path._lt_may_serve(200, 1024) and not fp8_path._lt_may_serve(256, 1000)

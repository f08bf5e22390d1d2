"""The fused rotary (rope_ext.kernels / rope_ext.rotary.apply_rotary) against independent references.

Without a GPU the Triton kernel runs under Triton's interpreter on CPU tensors. The interpreter is
chosen when a @triton.jit function is decorated and when triton's lazily imported submodules load,
so TRITON_INTERPRET=1 must be in the environment before the kernel module is imported: it is set
at the top of this module (the lead owns tests/conftest.py, and a fixture would run too late). If
another module imported triton first (a full test run: transformers and peft import it), this
process cannot interpret kernels; its tests skip and one test reruns this file in a fresh process
with TRITON_INTERPRET=1. On a machine with CUDA it is not set, the kernel is compiled, and the
``gpu`` tests compare it to the torch path on the device.

References: RoFormer's rotation as a complex product in float64 (z_i * e^{i m theta_i}, z_i =
x1_i + i x2_i, halves or interleaved pairs), and transformers' own ``apply_rotary_pos_emb``.
Tolerances: the two backends agree to float32 rounding (both compute in float32 and round once);
bfloat16 under the interpreter may differ by one bf16 ulp because the interpreter converts
float32 -> bfloat16 by truncation (seen with Triton 3.9), where the GPU and torch round to nearest.
"""
from __future__ import annotations

import os
import subprocess
import sys

import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:  # once triton is imported it is too late
    os.environ["TRITON_INTERPRET"] = "1"

import pytest
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from rope_ext.rotary import apply_rotary, cos_sin, rotate

triton = pytest.importorskip("triton")
CUDA = torch.cuda.is_available()


def _interpreted() -> bool:
    """True when triton's own @jit functions (tl.sum ...) were built for the interpreter."""
    from triton.language import standard
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(standard.sum, InterpretedFunction)


# In a full test run another module may import triton first (transformers / peft do): then the
# interpreter cannot be switched on in this process, and one test reruns this file in a fresh one.
RUN_HERE = CUDA or _interpreted()
FRESH = "test_fresh_process_runs_this_file"


@pytest.fixture(autouse=True)
def _here_or_in_fresh_process(request):
    if not RUN_HERE and request.node.originalname != FRESH:
        pytest.skip(f"triton was imported before TRITON_INTERPRET=1 could be set; {FRESH} runs this test in a fresh process")


def test_fresh_process_runs_this_file():
    if RUN_HERE:
        pytest.skip("this process runs the kernel tests itself")
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider"], env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout


gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (compiled Triton kernel)")


def inv_freq(r: int, base: float = 10000.0) -> torch.Tensor:
    return 1.0 / base ** (torch.arange(0, r, 2, dtype=torch.float64) / r)


def reference(x: torch.Tensor, pos: torch.Tensor, freqs: torch.Tensor, table_len: int, interleaved: bool, seq_first: bool = False, sign: float = 1.0) -> torch.Tensor:
    """float64 rotation of x (B, H, T, d) or (B, T, H, d) to positions pos (1|B, T); positions
    outside [0, table_len) stay unrotated."""
    r = 2 * freqs.numel()
    valid = (pos >= 0) & (pos < table_len)
    angle = torch.where(valid[..., None], pos[..., None].double() * freqs.to(pos.device), 0.0) * sign
    rot = torch.polar(torch.ones_like(angle), angle).unsqueeze(2 if seq_first else 1)
    xd = x.double()
    xr = xd[..., :r]
    a, b = (xr[..., 0::2], xr[..., 1::2]) if interleaved else (xr[..., : r // 2], xr[..., r // 2:])
    z = torch.complex(a, b) * rot
    rotated = torch.stack((z.real, z.imag), -1).flatten(-2) if interleaved else torch.cat((z.real, z.imag), -1)
    return torch.cat((rotated, xd[..., r:]), -1)


def tables(r: int, table_len: int, dtype: torch.dtype, batch: int = 1, device: str = "cpu"):
    """HF-style cos/sin (batch, table_len, r): emb = cat(freqs, freqs)."""
    pos = torch.arange(table_len, device=device)[None].expand(batch, -1)
    return cos_sin(inv_freq(r).float(), pos, 1.0, dtype)


TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}
AGREE = {torch.float32: dict(rtol=1e-6, atol=1e-6), torch.float16: dict(rtol=1e-3, atol=1e-3), torch.bfloat16: dict(rtol=2 ** -7, atol=1e-5)}


def both(q, k, cos, sin, **kw):
    """(triton, torch) results on clones, so in-place runs do not interfere."""
    clone = lambda x: None if x is None else x.clone()
    return (apply_rotary(clone(q), clone(k), cos, sin, kernel="triton", **kw),
            apply_rotary(clone(q), clone(k), cos, sin, kernel="torch", **kw))


def check(outs, refs, dtype):
    (tq, tk), (pq, pk) = outs
    for t, p, ref in ((tq, pq, refs[0]), (tk, pk, refs[1])):
        if ref is None:
            assert t is None and p is None
            continue
        assert t.dtype == p.dtype == dtype and t.shape == p.shape == ref.shape
        torch.testing.assert_close(t.double(), p.double(), **AGREE[dtype])
        torch.testing.assert_close(p.double(), ref, **TOL[dtype])


CASES = [  # (B, Hq, Hk, T, d, r, interleaved)
    (2, 4, 2, 5, 16, 16, False),     # GQA
    (2, 4, 2, 5, 16, 16, True),
    (1, 3, 1, 7, 24, 24, False),     # MQA, odd T, head dim 24 (half 12: padded tile)
    (1, 3, 1, 7, 24, 24, True),
    (2, 2, 2, 3, 32, 16, False),     # partial rotary (Phi / NeoX partial_rotary_factor 0.5)
    (2, 2, 2, 3, 32, 8, True),       # partial, interleaved, factor 0.25
    (1, 1, 1, 1, 256, 256, False),   # decode row, head dim 256
    (3, 5, 1, 9, 20, 12, False),     # odd everything, partial, pass-through of 8 dims
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}Hq{}Hk{}T{}d{}r{}{}".format(*c[:6], "i" if c[6] else "h"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_forward_matches_reference(case, dtype):
    B, Hq, Hk, T, d, r, interleaved = case
    torch.manual_seed(0)
    q, k = torch.randn(B, Hq, T, d).to(dtype), torch.randn(B, Hk, T, d).to(dtype)
    cos, sin = tables(r, T, dtype)
    pos = torch.arange(T)[None]
    refs = [reference(x, pos, inv_freq(r), T, interleaved) for x in (q, k)]
    check(both(q, k, cos, sin, interleaved=interleaved), refs, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_torch_path_equals_hf_and_rotate(dtype):
    """The torch path gives transformers' formula evaluated in float32 and rounded once (HF's own
    bfloat16 run rounds every intermediate, so it is only within bf16 tolerance of it)."""
    torch.manual_seed(1)
    q, k = torch.randn(2, 4, 6, 32).to(dtype), torch.randn(2, 2, 6, 32).to(dtype)
    cos, sin = tables(32, 6, dtype, batch=2)
    hq, hk = (x.to(dtype) for x in apply_rotary_pos_emb(q.float(), k.float(), cos.float(), sin.float()))
    oq, ok = apply_rotary(q, k, cos, sin, kernel="torch")
    torch.testing.assert_close(oq, hq, **AGREE[dtype])
    torch.testing.assert_close(ok, hk, **AGREE[dtype])
    torch.testing.assert_close(oq, apply_rotary_pos_emb(q, k, cos, sin)[0], **TOL[dtype])
    cp, sp = tables(16, 6, dtype, batch=2)
    partial = rotate(q.float(), cp.float(), sp.float()).to(dtype)
    torch.testing.assert_close(apply_rotary(q, None, cp, sp, kernel="torch")[0], partial, **AGREE[dtype])


@pytest.mark.parametrize("form", ["per_batch", "shared", "2d", "flash"])
def test_table_forms(form):
    """(B, T, r) per batch (different positions per row), (1, T, r), (T, r), and flash-attn's (T, r/2)."""
    torch.manual_seed(2)
    B, T, d = 2, 5, 16
    q, k = torch.randn(B, 3, T, d), torch.randn(B, 1, T, d)
    if form == "per_batch":
        pos = torch.tensor([[0, 1, 2, 3, 4], [7, 3, 9, 0, 2]])
        cos, sin = cos_sin(inv_freq(d).float(), pos, 1.0, torch.float32)
        refs = [reference(x, pos, inv_freq(d), 10, False) for x in (q, k)]
        check(both(q, k, cos, sin), refs, torch.float32)
        return
    cos, sin = tables(d, 8, torch.float32)
    kw = {}
    if form == "2d":
        cos, sin = cos[0], sin[0]
    if form == "flash":
        cos, sin, kw = cos[0, :, : d // 2].contiguous(), sin[0, :, : d // 2].contiguous(), dict(rotary_dim=d)
    refs = [reference(x, torch.arange(T)[None], inv_freq(d), 8, False) for x in (q, k)]
    check(both(q, k, cos, sin, **kw), refs, torch.float32)


@pytest.mark.parametrize("interleaved", [False, True])
def test_offsets_int_and_tensor(interleaved):
    """Decoding with a KV cache: token t goes to table row t + offset; past the table it stays put."""
    torch.manual_seed(3)
    B, T, d, table_len = 3, 2, 16, 12
    q, k = torch.randn(B, 4, T, d), torch.randn(B, 2, T, d)
    cos, sin = tables(d, table_len, torch.float32)
    for offsets in (5, torch.tensor([0, 4, 11])):
        pos = torch.arange(T)[None] + (offsets if isinstance(offsets, int) else offsets[:, None])
        refs = [reference(x, pos, inv_freq(d), table_len, interleaved) for x in (q, k)]
        check(both(q, k, cos, sin, offsets=offsets, interleaved=interleaved), refs, torch.float32)
    assert pos[2, 1] >= table_len  # the last row of the tensor case lies past the table: unrotated


@pytest.mark.parametrize("offsets", [None, 3, "tensor"])
def test_varlen_packed_sequences(offsets):
    """cu_seqlens: positions restart at each packed sequence (plus its offset); tokens after the
    last sequence end are left unrotated."""
    torch.manual_seed(4)
    lens, total, d = [3, 1, 4], 10, 16
    cu = torch.tensor([0, 3, 4, 8], dtype=torch.int32)
    q, k = torch.randn(1, 2, total, d), torch.randn(1, 1, total, d)
    off = torch.tensor([2, 0, 5]) if offsets == "tensor" else offsets
    pos = []
    for n, length in enumerate(lens):
        extra = 0 if off is None else (int(off[n]) if isinstance(off, torch.Tensor) else off)
        pos += [extra + i for i in range(length)]
    pos = torch.tensor(pos + [-1] * (total - sum(lens)))[None]
    cos, sin = tables(d, 16, torch.float32)
    refs = [reference(x, pos, inv_freq(d), 16, False) for x in (q, k)]
    check(both(q, k, cos, sin, cu_seqlens=cu, offsets=off), refs, torch.float32)


def test_seq_first_layout():
    torch.manual_seed(5)
    q, k = torch.randn(2, 5, 4, 16), torch.randn(2, 5, 2, 16)
    cos, sin = tables(16, 5, torch.float32)
    refs = [reference(x, torch.arange(5)[None], inv_freq(16), 5, True, seq_first=True) for x in (q, k)]
    check(both(q, k, cos, sin, layout="bthd", interleaved=True), refs, torch.float32)


def test_strided_hf_layout_and_q_or_k_alone():
    """q as HF attention modules have it (a transposed view of (B, T, H, d)); q or k alone."""
    torch.manual_seed(6)
    q = torch.randn(2, 5, 4, 16).transpose(1, 2)
    k = torch.randn(2, 5, 2, 16).transpose(1, 2)
    cos, sin = tables(16, 5, torch.float32)
    rq, rk = (reference(x, torch.arange(5)[None], inv_freq(16), 5, False) for x in (q, k))
    check(both(q, k, cos, sin), (rq, rk), torch.float32)
    check(both(q, None, cos, sin), (rq, None), torch.float32)
    check(both(None, k, cos, sin), (None, rk), torch.float32)


@pytest.mark.parametrize("kernel", ["triton", "torch"])
def test_inplace(kernel):
    torch.manual_seed(7)
    q, k = torch.randn(2, 4, 5, 32), torch.randn(2, 2, 5, 32)
    cos, sin = tables(16, 5, torch.float32)
    refs = [reference(x, torch.arange(5)[None], inv_freq(16), 5, False) for x in (q, k)]
    q2, k2 = q.clone(), k.clone()
    oq, ok = apply_rotary(q2, k2, cos, sin, kernel=kernel, inplace=True)
    assert oq is q2 and ok is k2
    torch.testing.assert_close(q2.double(), refs[0], **TOL[torch.float32])
    torch.testing.assert_close(k2.double(), refs[1], **TOL[torch.float32])


@pytest.mark.parametrize("kernel", ["triton", "torch"])
@pytest.mark.parametrize("interleaved,r,inplace", [(False, 16, False), (True, 16, False), (False, 8, True)])
def test_backward_is_rotation_by_minus_theta(kernel, interleaved, r, inplace):
    """d/dx <R(theta) x, g> = R(-theta) g; also equal to autograd through transformers' formula."""
    torch.manual_seed(8)
    B, T, d = 2, 5, 16
    q0, k0 = torch.randn(B, 4, T, d), torch.randn(B, 2, T, d)
    gq, gk = torch.randn(B, 4, T, d), torch.randn(B, 2, T, d)
    cos, sin = tables(r, T, torch.float32, batch=B)
    q, k = q0.clone().requires_grad_(), k0.clone().requires_grad_()
    qi, ki = (q * 1, k * 1) if inplace else (q, k)
    oq, ok = apply_rotary(qi, ki, cos, sin, kernel=kernel, interleaved=interleaved, inplace=inplace)
    torch.autograd.backward((oq, ok), (gq, gk))
    pos = torch.arange(T)[None]
    for x, g in ((q, gq), (k, gk)):
        torch.testing.assert_close(x.grad.double(), reference(g, pos, inv_freq(r), T, interleaved, sign=-1.0), **TOL[torch.float32])
    if not interleaved:
        hq, hk = q0.clone().requires_grad_(), k0.clone().requires_grad_()
        a, b = apply_rotary_pos_emb(hq[..., :r], hk[..., :r], cos, sin)
        torch.autograd.backward((torch.cat((a, hq[..., r:]), -1), torch.cat((b, hk[..., r:]), -1)), (gq, gk))
        torch.testing.assert_close(q.grad, hq.grad, **AGREE[torch.float32])
        torch.testing.assert_close(k.grad, hk.grad, **AGREE[torch.float32])


def test_bad_arguments_raise_before_writing():
    q, k = torch.randn(2, 4, 5, 16), torch.randn(2, 2, 5, 16)
    cos, sin = tables(16, 5, torch.float32)
    q0 = q.clone()
    bad = [
        (dict(kernel="cuda"), "kernel must be one of"),
        (dict(layout="bshd"), "layout must be one of"),
        (dict(rotary_dim=12), "rotary_dim=12"),
        (dict(offsets=torch.tensor([1, 2, 3])), r"offsets tensor must be int32/int64 of shape \(2,\)"),
        (dict(offsets=1.5), "offsets must be an int"),
        (dict(cu_seqlens=torch.tensor([0, 5])), "cu_seqlens needs packed sequences in batch 1"),
    ]
    for kw, msg in bad:
        with pytest.raises(ValueError, match=msg):
            apply_rotary(q, k, cos, sin, inplace=True, **kw)
    with pytest.raises(ValueError, match="must match q"):
        apply_rotary(q, k[:, :, :4], cos, sin)
    with pytest.raises(ValueError, match="cos/sin must both be"):
        apply_rotary(q, k, cos, sin[:, :4])
    with pytest.raises(ValueError, match=r"rotary_dim=18 must be even, <= head dim 16"):
        apply_rotary(q, k, *tables(18, 5, torch.float32))
    assert torch.equal(q, q0)


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    if CUDA:
        pytest.skip("CUDA present: Triton on CPU tensors is the interpreter's business only")
    monkeypatch.delenv("TRITON_INTERPRET")
    q = torch.randn(1, 1, 2, 8)
    with pytest.raises(ValueError, match="kernel='triton' needs CUDA tensors"):
        apply_rotary(q, None, *tables(8, 2, torch.float32), kernel="triton")
    assert apply_rotary(q, None, *tables(8, 2, torch.float32), kernel="auto")[0].shape == q.shape


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("interleaved", [False, True])
def test_gpu_compiled_kernel_matches_torch(dtype, interleaved):
    """Compiled kernel on CUDA vs the torch path: prefill, decode with offsets, varlen, partial."""
    torch.manual_seed(9)
    dev = "cuda"
    for B, Hq, Hk, T, d, r in ((2, 32, 8, 1000, 128, 128), (4, 32, 8, 1, 128, 128), (1, 12, 1, 77, 80, 32), (1, 8, 8, 300, 256, 256)):
        q, k = torch.randn(B, Hq, T, d, device=dev, dtype=dtype), torch.randn(B, Hk, T, d, device=dev, dtype=dtype)
        cos, sin = tables(r, 2048, dtype, device=dev)
        offsets = torch.randint(0, 1000, (B,), device=dev) if T == 1 else 7
        kw = dict(interleaved=interleaved, offsets=offsets)
        a = apply_rotary(q, k, cos, sin, kernel="triton", **kw)
        b = apply_rotary(q, k, cos, sin, kernel="torch", **kw)
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, **AGREE[dtype])
    cu = torch.tensor([0, 100, 101, 600], device=dev, dtype=torch.int32)
    q, k = torch.randn(1, 32, 600, 128, device=dev, dtype=dtype), torch.randn(1, 8, 600, 128, device=dev, dtype=dtype)
    cos, sin = tables(128, 1024, dtype, device=dev)
    a = apply_rotary(q, k, cos, sin, kernel="triton", cu_seqlens=cu, interleaved=interleaved)
    b = apply_rotary(q, k, cos, sin, kernel="torch", cu_seqlens=cu, interleaved=interleaved)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, **AGREE[dtype])


@gpu
@needs_gpu
def test_gpu_backward_matches_torch():
    torch.manual_seed(10)
    q = torch.randn(2, 32, 513, 128, device="cuda", requires_grad=True)
    k = torch.randn(2, 8, 513, 128, device="cuda", requires_grad=True)
    cos, sin = tables(128, 513, torch.float32, batch=2, device="cuda")
    g = [torch.randn_like(q), torch.randn_like(k)]
    grads = []
    for kernel in ("triton", "torch"):
        torch.autograd.backward(apply_rotary(q, k, cos, sin, kernel=kernel), g)
        grads.append((q.grad.clone(), k.grad.clone()))
        q.grad = k.grad = None
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype,inplace", [(torch.bfloat16, False), (torch.float32, True), (torch.float16, True)])
@pytest.mark.parametrize("layout", ["bhtd", "bthd"])
def test_torch_path_chunks_agree_with_one_pass(monkeypatch, dtype, inplace, layout):
    """The low-precision / in-place torch path works through sequence chunks; any chunking gives
    the same numbers as one pass."""
    import rope_ext.kernels.rotary_ops_torch as rt

    torch.manual_seed(11)
    shape = (2, 7, 3, 16) if layout == "bthd" else (2, 3, 7, 16)
    q, k = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
    cos, sin = tables(12, 9, dtype, batch=2)
    kw = dict(kernel="torch", inplace=inplace, layout=layout, offsets=torch.tensor([0, 2]))
    whole = apply_rotary(q.clone(), k.clone(), cos, sin, **kw)
    monkeypatch.setattr(rt, "CHUNK", 40)  # 2 tokens of 3 heads x 6 pairs x 2 per chunk: 4 chunks
    chunked = apply_rotary(q.clone(), k.clone(), cos, sin, **kw)
    for a, b in zip(whole, chunked):
        assert torch.equal(a, b)
    ref = reference(q, torch.arange(7)[None] + torch.tensor([[0], [2]]), inv_freq(12), 9, False, seq_first=layout == "bthd")
    torch.testing.assert_close(chunked[0].double(), ref, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("layout", ["bhtd", "bthd"])
@pytest.mark.parametrize("offsets", ["tensor", "none"])
@pytest.mark.parametrize("rounding", ["once", "each"])
def test_torch_small_path_equals_general_path(monkeypatch, dtype, interleaved, layout, offsets, rounding):
    """Decode-sized inputs take a few-calls path (q and k concatenated, the tables' first half viewed
    in place); it performs the same operations as the general path in either rounding, forward and
    backward, for q and k together or alone, so the results are identical."""
    import rope_ext.kernels.rotary_ops_torch as rt

    torch.manual_seed(12)
    q0, k0 = torch.randn(3, 4, 2, 16).to(dtype), torch.randn(3, 2, 2, 16).to(dtype)
    if layout == "bthd":
        q0, k0 = q0.transpose(1, 2).contiguous(), k0.transpose(1, 2).contiguous()
    cos, sin = tables(16, 6, dtype)
    if offsets == "none":  # per-sequence rows as a model hands them over, halves made different on purpose
        cos, sin = cos[:, 3:5].expand(3, -1, -1).clone(), sin[:, 3:5].expand(3, -1, -1).clone()
        cos[..., 8:], sin[..., 8:] = 7.0, -7.0
    g = torch.randn_like(q0), torch.randn_like(k0)
    results = []
    for small in (1 << 30, 0):
        monkeypatch.setattr(rt, "SMALL", small)
        q, k = q0.clone().requires_grad_(), k0.clone().requires_grad_()
        kw = dict(kernel="torch", interleaved=interleaved, layout=layout, rounding=rounding,
                  offsets=torch.tensor([0, 3, 4]) if offsets == "tensor" else None)
        outs = apply_rotary(q, k, cos, sin, **kw)
        torch.autograd.backward(outs, g)
        with torch.no_grad():
            alone = apply_rotary(q0, None, cos, sin, **kw)[0], apply_rotary(None, k0, cos, sin, **kw)[1]
        results.append((*outs, q.grad, k.grad, *alone))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    assert torch.equal(results[0][0], results[0][4]) and torch.equal(results[0][1], results[0][5])


def test_rounding_each_is_the_torch_ops_alone():
    """The Triton op rounds once; rounding="each" is refused there and sends "auto" to torch."""
    device = "cuda" if CUDA else "cpu"
    q = torch.randn(1, 2, 3, 8, device=device, dtype=torch.bfloat16)
    cos, sin = tables(8, 3, torch.bfloat16, device=device)
    with pytest.raises(ValueError, match="rounds once"):
        apply_rotary(q, None, cos, sin, kernel="triton", rounding="each")
    auto = apply_rotary(q, None, cos, sin, rounding="each")[0]
    assert torch.equal(auto, apply_rotary(q, None, cos, sin, kernel="torch", rounding="each")[0])

"""The torch rotary path (``apply_rotary(kernel="torch")``, ``rotary_ops_torch``, ``rotary_autograd``)
against independent references; needs no triton. The Triton kernel is held to the same scenarios
in tests/test_kernels_rotary.py, which imports the references and scenarios from here.

References: RoFormer's rotation as a complex product in float64 (z_i * e^{i m theta_i}, z_i =
x1_i + i x2_i, halves or interleaved pairs), and transformers' own ``apply_rotary_pos_emb``.
Tolerances: TOL against the float64 reference (one rounding to the dtype); AGREE between two
computations that both work in float32 and round once (bfloat16: one bf16 ulp, see
tests/test_kernels_rotary.py).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from rope_ext.rotary import apply_rotary, cos_sin, rotate

CPU = torch.device("cpu")
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}
AGREE = {torch.float32: dict(rtol=1e-6, atol=1e-6), torch.float16: dict(rtol=1e-3, atol=1e-3), torch.bfloat16: dict(rtol=2 ** -7, atol=1e-5)}


def inv_freq(r: int, base: float = 10000.0) -> torch.Tensor:
    return 1.0 / base ** (torch.arange(0, r, 2, dtype=torch.float64) / r)


def reference(x: torch.Tensor, pos: torch.Tensor, freqs: torch.Tensor, table_len: int, interleaved: bool,
              seq_first: bool = False, sign: float = 1.0) -> torch.Tensor:
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


def tables(r: int, table_len: int, dtype: torch.dtype, batch: int = 1, device: torch.device = CPU) -> tuple[torch.Tensor, torch.Tensor]:
    """HF-style cos/sin (batch, table_len, r): emb = cat(freqs, freqs)."""
    pos = torch.arange(table_len, device=device)[None].expand(batch, -1)
    return cos_sin(inv_freq(r).float(), pos, 1.0, dtype)


def randn(seed: int, *shapes: tuple[int, ...], dtype: torch.dtype = torch.float32, device: torch.device = CPU) -> list[torch.Tensor]:
    """Tensors drawn in float32 on the CPU from a generator seeded with ``seed`` (the same numbers on
    every device), converted to ``dtype`` and moved to ``device``."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g).to(device=device, dtype=dtype) for shape in shapes]


@dataclass
class Scenario:
    """Inputs of one apply_rotary call and the float64 reference of q' and k'."""
    q: torch.Tensor | None
    k: torch.Tensor | None
    cos: torch.Tensor
    sin: torch.Tensor
    kw: dict[str, Any]
    refs: tuple[torch.Tensor | None, torch.Tensor | None]
    dtype: torch.dtype = torch.float32

    def run(self, kernel: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """apply_rotary on clones (so in-place runs cannot touch the inputs)."""
        clone = lambda x: None if x is None else x.clone()
        return apply_rotary(clone(self.q), clone(self.k), self.cos, self.sin, kernel=kernel, **self.kw)


def references(q: torch.Tensor | None, k: torch.Tensor | None, pos: torch.Tensor, r: int, table_len: int,
               interleaved: bool, seq_first: bool = False) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    return tuple(None if x is None else reference(x, pos, inv_freq(r), table_len, interleaved, seq_first) for x in (q, k))


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


def shapes_and_dtype(arg: tuple[tuple, torch.dtype], device: torch.device) -> Scenario:
    (B, Hq, Hk, T, d, r, interleaved), dtype = arg
    q, k = randn(0, (B, Hq, T, d), (B, Hk, T, d), dtype=dtype, device=device)
    cos, sin = tables(r, T, dtype, device=device)
    pos = torch.arange(T, device=device)[None]
    return Scenario(q, k, cos, sin, dict(interleaved=interleaved), references(q, k, pos, r, T, interleaved), dtype)


def table_form(form: str, device: torch.device) -> Scenario:
    """(B, T, r) per batch (different positions per row), (1, T, r), (T, r), and flash-attn's (T, r/2)."""
    B, T, d = 2, 5, 16
    q, k = randn(2, (B, 3, T, d), (B, 1, T, d), device=device)
    if form == "per_batch":
        pos = torch.tensor([[0, 1, 2, 3, 4], [7, 3, 9, 0, 2]], device=device)
        cos, sin = cos_sin(inv_freq(d).float(), pos, 1.0, torch.float32)
        return Scenario(q, k, cos, sin, {}, references(q, k, pos, d, 10, False))
    cos, sin = tables(d, 8, torch.float32, device=device)
    kw: dict[str, Any] = {}
    if form == "2d":
        cos, sin = cos[0], sin[0]
    if form == "flash":
        cos, sin, kw = cos[0, :, : d // 2].contiguous(), sin[0, :, : d // 2].contiguous(), dict(rotary_dim=d)
    return Scenario(q, k, cos, sin, kw, references(q, k, torch.arange(T, device=device)[None], d, 8, False))


def offsets(arg: tuple[bool, str], device: torch.device) -> Scenario:
    """Decoding with a KV cache: token t goes to table row t + offset; past the table it stays put
    (the tensor case's last row, 11 + 1, lies past the 12-row table)."""
    interleaved, kind = arg
    B, T, d, table_len = 3, 2, 16, 12
    q, k = randn(3, (B, 4, T, d), (B, 2, T, d), device=device)
    cos, sin = tables(d, table_len, torch.float32, device=device)
    off = 5 if kind == "int" else torch.tensor([0, 4, 11], device=device)
    pos = torch.arange(T, device=device)[None] + (off if isinstance(off, int) else off[:, None])
    return Scenario(q, k, cos, sin, dict(offsets=off, interleaved=interleaved), references(q, k, pos, d, table_len, interleaved))


def packed(kind: str, device: torch.device) -> Scenario:
    """cu_seqlens: positions restart at each packed sequence (plus its offset); tokens after the
    last sequence end are left unrotated."""
    lens, total, d = [3, 1, 4], 10, 16
    q, k = randn(4, (1, 2, total, d), (1, 1, total, d), device=device)
    off, starts = {"none": (None, [0, 0, 0]), "int": (3, [3, 3, 3]), "tensor": (torch.tensor([2, 0, 5], device=device), [2, 0, 5])}[kind]
    pos = [start + i for start, n in zip(starts, lens) for i in range(n)] + [-1] * (total - sum(lens))
    pos = torch.tensor(pos, device=device)[None]
    cos, sin = tables(d, 16, torch.float32, device=device)
    cu = torch.tensor([0, 3, 4, 8], dtype=torch.int32, device=device)
    return Scenario(q, k, cos, sin, dict(cu_seqlens=cu, offsets=off), references(q, k, pos, d, 16, False))


def seq_first(_: None, device: torch.device) -> Scenario:
    q, k = randn(5, (2, 5, 4, 16), (2, 5, 2, 16), device=device)
    cos, sin = tables(16, 5, torch.float32, device=device)
    refs = references(q, k, torch.arange(5, device=device)[None], 16, 5, True, seq_first=True)
    return Scenario(q, k, cos, sin, dict(layout="bthd", interleaved=True), refs)


def strided(which: str, device: torch.device) -> Scenario:
    """q as HF attention modules have it (a transposed view of (B, T, H, d)); q or k alone."""
    q, k = (x.transpose(1, 2) for x in randn(6, (2, 5, 4, 16), (2, 5, 2, 16), device=device))
    q, k = (q if "q" in which else None), (k if "k" in which else None)
    cos, sin = tables(16, 5, torch.float32, device=device)
    return Scenario(q, k, cos, sin, {}, references(q, k, torch.arange(5, device=device)[None], 16, 5, False))


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SCENARIOS: list[tuple[str, Callable[[Any, torch.device], Scenario], Any]] = [
    *[("B{}Hq{}Hk{}T{}d{}r{}{}-{}".format(*c[:6], "i" if c[6] else "h", str(t).split(".")[1]), shapes_and_dtype, (c, t))
      for c in CASES for t in DTYPES],
    *[(f"tables-{form}", table_form, form) for form in ("per_batch", "shared", "2d", "flash")],
    *[(f"offsets-{kind}-{'i' if i else 'h'}", offsets, (i, kind)) for kind in ("int", "tensor") for i in (False, True)],
    *[(f"packed-offsets-{kind}", packed, kind) for kind in ("none", "int", "tensor")],
    ("seq-first", seq_first, None),
    *[(f"strided-{which}", strided, which) for which in ("qk", "q", "k")],
]
SCENARIO_PARAMS = [pytest.param(build, arg, id=name) for name, build, arg in SCENARIOS]


@pytest.mark.parametrize("build,arg", SCENARIO_PARAMS)
def test_torch_path_matches_reference(build: Callable[[Any, torch.device], Scenario], arg: Any) -> None:
    s = build(arg, CPU)
    for out, ref in zip(s.run("torch"), s.refs):
        if ref is None:
            assert out is None
            continue
        assert out.dtype == s.dtype and out.shape == ref.shape
        torch.testing.assert_close(out.double(), ref, **TOL[s.dtype])


def assert_inplace_rotates(kernel: str, device: torch.device) -> None:
    """inplace=True returns q and k themselves, overwritten with the rotation (partial: r = 16 of 32)."""
    q, k = randn(7, (2, 4, 5, 32), (2, 2, 5, 32), device=device)
    cos, sin = tables(16, 5, torch.float32, device=device)
    refs = references(q, k, torch.arange(5, device=device)[None], 16, 5, False)
    oq, ok = apply_rotary(q, k, cos, sin, kernel=kernel, inplace=True)
    assert oq is q and ok is k
    torch.testing.assert_close(q.double(), refs[0], **TOL[torch.float32])
    torch.testing.assert_close(k.double(), refs[1], **TOL[torch.float32])


def assert_backward_is_rotation_by_minus_theta(kernel: str, device: torch.device, interleaved: bool, r: int, inplace: bool) -> None:
    """d/dx <R(theta) x, g> = R(-theta) g; also equal to autograd through transformers' formula."""
    B, T, d = 2, 5, 16
    q0, k0, gq, gk = randn(8, (B, 4, T, d), (B, 2, T, d), (B, 4, T, d), (B, 2, T, d), device=device)
    cos, sin = tables(r, T, torch.float32, batch=B, device=device)
    q, k = q0.clone().requires_grad_(), k0.clone().requires_grad_()
    qi, ki = (q * 1, k * 1) if inplace else (q, k)
    oq, ok = apply_rotary(qi, ki, cos, sin, kernel=kernel, interleaved=interleaved, inplace=inplace)
    torch.autograd.backward((oq, ok), (gq, gk))
    pos = torch.arange(T, device=device)[None]
    for x, g in ((q, gq), (k, gk)):
        torch.testing.assert_close(x.grad.double(), reference(g, pos, inv_freq(r), T, interleaved, sign=-1.0), **TOL[torch.float32])
    if not interleaved:
        hq, hk = q0.clone().requires_grad_(), k0.clone().requires_grad_()
        a, b = apply_rotary_pos_emb(hq[..., :r], hk[..., :r], cos, sin)
        torch.autograd.backward((torch.cat((a, hq[..., r:]), -1), torch.cat((b, hk[..., r:]), -1)), (gq, gk))
        torch.testing.assert_close(q.grad, hq.grad, **AGREE[torch.float32])
        torch.testing.assert_close(k.grad, hk.grad, **AGREE[torch.float32])


BACKWARD = [(False, 16, False), (True, 16, False), (False, 8, True)]  # (interleaved, r, inplace)


def test_torch_inplace() -> None:
    assert_inplace_rotates("torch", CPU)


@pytest.mark.parametrize("interleaved,r,inplace", BACKWARD)
def test_torch_backward_is_rotation_by_minus_theta(interleaved: bool, r: int, inplace: bool) -> None:
    assert_backward_is_rotation_by_minus_theta("torch", CPU, interleaved, r, inplace)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_torch_path_equals_hf_and_rotate(dtype: torch.dtype) -> None:
    """The torch path gives transformers' formula evaluated in float32 and rounded once (HF's own
    bfloat16 run rounds every intermediate, so it is only within bf16 tolerance of it)."""
    q, k = randn(1, (2, 4, 6, 32), (2, 2, 6, 32), dtype=dtype)
    cos, sin = tables(32, 6, dtype, batch=2)
    hq, hk = (x.to(dtype) for x in apply_rotary_pos_emb(q.float(), k.float(), cos.float(), sin.float()))
    oq, ok = apply_rotary(q, k, cos, sin, kernel="torch")
    torch.testing.assert_close(oq, hq, **AGREE[dtype])
    torch.testing.assert_close(ok, hk, **AGREE[dtype])
    torch.testing.assert_close(oq, apply_rotary_pos_emb(q, k, cos, sin)[0], **TOL[dtype])
    cp, sp = tables(16, 6, dtype, batch=2)
    partial = rotate(q.float(), cp.float(), sp.float()).to(dtype)
    torch.testing.assert_close(apply_rotary(q, None, cp, sp, kernel="torch")[0], partial, **AGREE[dtype])


def test_bad_arguments_raise_before_writing() -> None:
    q, k = randn(13, (2, 4, 5, 16), (2, 2, 5, 16))
    cos, sin = tables(16, 5, torch.float32)
    q0 = q.clone()
    bad = [
        (dict(kernel="cuda"), "kernel must be one of auto, triton, torch, compiled, got 'cuda'"),
        (dict(layout="bshd"), r"layout must be one of \('bhtd', 'bthd'\), got 'bshd'"),
        (dict(rotary_dim=12), "rotary_dim=12 must be even, <= head dim 16, and equal the tables' width 16"),
        (dict(offsets=torch.tensor([1, 2, 3])), r"offsets tensor must be int32/int64 of shape \(2,\)"),
        (dict(offsets=1.5), "offsets must be an int, a per-sequence int tensor or None, got float"),
        (dict(cu_seqlens=torch.tensor([0, 5])), "cu_seqlens needs packed sequences in batch 1"),
    ]
    for kw, msg in bad:
        with pytest.raises(ValueError, match=msg):
            apply_rotary(q, k, cos, sin, inplace=True, **kw)
    with pytest.raises(ValueError, match=r"k \(2, 2, 4, 16\) torch.float32 must match q \(2, 4, 5, 16\)"):
        apply_rotary(q, k[:, :, :4], cos, sin)
    with pytest.raises(ValueError, match=r"cos/sin must both be \(T, w\), \(1, T, w\) or \(2, T, w\)"):
        apply_rotary(q, k, cos, sin[:, :4])
    with pytest.raises(ValueError, match=r"rotary_dim=18 must be even, <= head dim 16"):
        apply_rotary(q, k, *tables(18, 5, torch.float32))
    assert torch.equal(q, q0)


@pytest.mark.parametrize("dtype,inplace", [(torch.bfloat16, False), (torch.float32, True), (torch.float16, True)])
@pytest.mark.parametrize("layout", ["bhtd", "bthd"])
def test_torch_path_chunks_agree_with_one_pass(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, inplace: bool, layout: str) -> None:
    """The low-precision / in-place torch path works through sequence chunks; any chunking gives
    the same numbers as one pass."""
    import rope_ext.kernels.rotary_ops_torch as rt

    shape = (2, 7, 3, 16) if layout == "bthd" else (2, 3, 7, 16)
    q, k = randn(11, shape, shape, dtype=dtype)
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
def test_torch_small_path_equals_general_path(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, interleaved: bool,
                                              layout: str, offsets: str, rounding: str) -> None:
    """Decode-sized inputs take a few-calls path (q and k concatenated, the tables' first half viewed
    in place); it performs the same operations as the general path in either rounding, forward and
    backward, for q and k together or alone, so the results are identical."""
    import rope_ext.kernels.rotary_ops_torch as rt

    q0, k0, gq, gk = randn(12, (3, 4, 2, 16), (3, 2, 2, 16), (3, 4, 2, 16), (3, 2, 2, 16), dtype=dtype)
    if layout == "bthd":
        q0, k0, gq, gk = (x.transpose(1, 2).contiguous() for x in (q0, k0, gq, gk))
    cos, sin = tables(16, 6, dtype)
    if offsets == "none":  # per-sequence rows as a model hands them over, halves made different on purpose
        cos, sin = cos[:, 3:5].expand(3, -1, -1).clone(), sin[:, 3:5].expand(3, -1, -1).clone()
        cos[..., 8:], sin[..., 8:] = 7.0, -7.0
    results = []
    for small in (1 << 30, 0):
        monkeypatch.setattr(rt, "SMALL", small)
        q, k = q0.clone().requires_grad_(), k0.clone().requires_grad_()
        kw = dict(kernel="torch", interleaved=interleaved, layout=layout, rounding=rounding,
                  offsets=torch.tensor([0, 3, 4]) if offsets == "tensor" else None)
        outs = apply_rotary(q, k, cos, sin, **kw)
        torch.autograd.backward(outs, (gq, gk))
        with torch.no_grad():
            alone = apply_rotary(q0, None, cos, sin, **kw)[0], apply_rotary(None, k0, cos, sin, **kw)[1]
        results.append((*outs, q.grad, k.grad, *alone))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    assert torch.equal(results[0][0], results[0][4]) and torch.equal(results[0][1], results[0][5])

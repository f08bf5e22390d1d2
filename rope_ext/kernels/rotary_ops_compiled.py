"""The compiled rotary op: the torch op's arithmetic (``rounding="once"``) as one inductor kernel per shape.

The same formula as ``rotary_ops_torch`` (RoFormer eq. 34 on the pairs (x1, x2) of the first r
dims): x1' = x1 c - x2 s, x2' = x2 c + x1 s (conjugate: s -> -s), in float32 (float64 for float64
input) from the input and table dtypes, rounded once to the input dtype. Written for inductor as one
pointwise expression over the pair view of x (``x.unflatten(-1, (2, r/2))``, ``(r/2, 2)``
interleaved): x' = x c + swap(x) (-s, s), so q' and k' are each one read of x, of the tables' first
half and one write, with no intermediate buffer (a concatenation of the two halves would make
inductor write a float32 buffer first). Inductor's C++ is built with ``-ffp-contract=off`` (no
fused multiply-add), so each product and the sum are rounded to the working dtype: the numbers
are bitwise transformers' ``x * cos + rotate_half(x) * sin`` evaluated in float32 and rounded once
to the input dtype, in every dtype (tests/test_rotary_compiled.py). The torch op computes the same
formula with addcmul, which a CPU with FMA evaluates without rounding x2 s; the two agree to one
float32 rounding of that product (bf16 / fp16: to one ulp of the dtype, where that float32
difference crosses a rounding boundary).

Compiling: the expression is traced with ``make_fx`` and compiled by ``torch._inductor.compile``
for the exact sizes, strides and dtypes of the call (static shapes); no dynamo, so a call costs
our cache lookup plus one kernel, and this module's key is the only guard. Graphs are kept in a
least-recently-used cache of ``MAX_GRAPHS`` keyed by (the inputs' sizes, strides and dtypes, the
flags, the thread count, which inductor's CPU code fixes at compile time). Positions, offsets and
``cu_seqlens`` are resolved before the graph (``rotary_ops_torch``'s ``positions`` /
``gather_tables``: small (1|B, T) work), so the graph only sees the rows it rotates by.
``inplace=True`` computes out of place and copies into q and k (one more pass). A failed compile
raises ``CompileError`` and is remembered in ``FAILURE``; ``auto_op`` (what ``kernel="auto"`` runs
on the CPU) then uses the torch op, and also before a shape's ``AUTO_AFTER``-th call, so a shape seen
once or twice never pays a compile (those calls have the torch op's numbers, see above).
"""
from __future__ import annotations

import functools
import time
from collections import OrderedDict
from collections.abc import Callable

import torch

from . import rotary_ops_torch

MAX_GRAPHS = 64  # compiled graphs kept; the least recently used goes first
AUTO_AFTER = 3  # auto_op compiles a shape at its third call
# the cache key already fixes sizes and strides; compiling in this process halves a compile's time (no worker pool)
OPTIONS = {"size_asserts": False, "alignment_asserts": False, "compile_threads": 1}
_GRAPHS: OrderedDict[tuple, Callable] = OrderedDict()
_SEEN: dict[tuple, int] = {}
COMPILE_SECONDS: dict[tuple, float] = {}  # key of a kept graph -> seconds its compile took (the benchmark reports them)
FAILURE: list[str] = []  # why compiling failed in this process (empty: it has not)


class CompileError(RuntimeError):
    """Inductor could not compile the rotary graph (no C++ compiler, no inductor, ...)."""


def rotate_pairs(xs: list[torch.Tensor], c: torch.Tensor, s: torch.Tensor, *, rotary_dim: int, interleaved: bool,
                 conjugate: bool, seq_first: bool) -> list[torch.Tensor]:
    """The traced expression: each x of ``xs`` rotated by the rows c, s (1|B, T, w) (first r/2 columns
    used), x c + swap(x) (-s, s) over the pair view in the working dtype, rounded once; dims past r pass.
    Each x is computed in its memory order (heads and tokens swapped when the heads are the inner
    of the two, as in HF's transposed q), so inductor writes the result in x's layout in the same
    pass instead of copying a buffer into it."""
    half = rotary_dim // 2
    work = torch.promote_types(torch.promote_types(xs[0].dtype, c.dtype), torch.float32)
    pair = -1 if interleaved else -2
    c, s = (t[..., :half].to(work).unsqueeze(pair) for t in (c, s))
    signed = torch.cat((s, -s) if conjugate else (-s, s), pair)
    outs = []
    for x in xs:
        swapped = x.stride(1) < x.stride(2)
        xm = x.transpose(1, 2) if swapped else x
        heads = 1 if seq_first == swapped else 2  # the axis the tables broadcast over
        xv = xm[..., :rotary_dim].to(work).unflatten(-1, (half, 2) if interleaved else (2, half))
        rotated = (xv * c.unsqueeze(heads) + xv.flip(pair) * signed.unsqueeze(heads)).flatten(-2).to(x.dtype)
        if rotary_dim < x.shape[-1]:
            rotated = torch.cat((rotated, xm[..., rotary_dim:]), -1)
        outs.append(rotated.transpose(1, 2) if swapped else rotated)
    return outs


def _signature(t: torch.Tensor) -> tuple:
    return t.shape, t.stride(), t.dtype, t.device


def _compile(key: tuple, inputs: list[torch.Tensor], flags: dict) -> Callable:
    """Trace ``rotate_pairs`` for these inputs and compile it with inductor; CompileError if that fails."""
    from torch.fx.experimental.proxy_tensor import make_fx

    began = time.perf_counter()
    n = len(inputs) - 2
    fn = functools.partial(_flat, n=n, flags=flags)
    example = [t.detach() for t in inputs]
    try:
        with torch.no_grad():
            graph = make_fx(fn)(*example)
            compiled = torch._inductor.compile(graph, example, options=OPTIONS)
    except Exception as err:  # noqa: BLE001 - any failure of the toolchain means: no compiled path here
        FAILURE.append(f"{type(err).__name__}: {err}")
        raise CompileError(f"kernel='compiled' could not compile the rotary graph ({type(err).__name__}: {err}); "
                           "use kernel='torch' or 'auto'") from err
    COMPILE_SECONDS[key] = time.perf_counter() - began
    return compiled


def _flat(*tensors: torch.Tensor, n: int, flags: dict) -> list[torch.Tensor]:
    return rotate_pairs(list(tensors[:n]), tensors[n], tensors[n + 1], **flags)


def _plan(q, k, cos, sin, rotary_dim, interleaved, offsets, cu_seqlens, conjugate, seq_first) -> tuple[list[torch.Tensor], dict]:
    """(inputs, flags) of a call: q and / or k and the table rows they rotate by (views where the
    rows are a slice of the tables), and the expression's flags."""
    x0 = q if q is not None else k
    seqlen = x0.shape[1] if seq_first else x0.shape[2]
    pos = rotary_ops_torch.positions(seqlen, offsets, cu_seqlens, x0.device)
    c, s = rotary_ops_torch.gather_tables(cos, sin, rotary_dim // 2, pos, seqlen, cos.dtype)
    inputs = [x for x in (q, k) if x is not None] + [c, s]
    return inputs, dict(rotary_dim=rotary_dim, interleaved=interleaved, conjugate=conjugate, seq_first=seq_first)


def _key(q, k, inputs: list[torch.Tensor], flags: dict) -> tuple:
    """The graph cache key: which of q / k, every input's sizes, strides, dtype and device, the
    flags and the thread count."""
    return (q is None, k is None, *(_signature(t) for t in inputs), *flags.values(), torch.get_num_threads())


def _graph(key: tuple, inputs: list[torch.Tensor], flags: dict) -> Callable:
    graph = _GRAPHS.get(key)
    if graph is None:
        graph = _GRAPHS[key] = _compile(key, inputs, flags)
        if len(_GRAPHS) > MAX_GRAPHS:
            COMPILE_SECONDS.pop(_GRAPHS.popitem(last=False)[0], None)
    else:
        _GRAPHS.move_to_end(key)
    return graph


def _run(graph: Callable, q, k, inputs: list[torch.Tensor], inplace: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    outs = graph(*inputs)
    if inplace:
        outs = [x.copy_(o) for x, o in zip(inputs, outs)]
    if q is None or k is None:
        return (outs[0], None) if k is None else (None, outs[0])
    return outs[0], outs[1]


def rotary_op(
    q: torch.Tensor | None,
    k: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    rotary_dim: int,
    interleaved: bool = False,
    offsets: int | torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    conjugate: bool = False,
    inplace: bool = False,
    seq_first: bool = False,
    rounding: str = "once",
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Rotate q and k as ``rotary_ops_torch.rotary_op`` with rounding="once", by a graph compiled for
    this call's shapes (on first sight; ``CompileError`` if it cannot be). Arguments are assumed
    valid (``rotary_autograd.check_args``; rounding is "once"). Inside a region that torch.compile
    is tracing, the expression itself is traced into the caller's graph (the same numbers)."""
    inputs, flags = _plan(q, k, cos, sin, rotary_dim, interleaved, offsets, cu_seqlens, conjugate, seq_first)
    if torch.compiler.is_compiling():
        return _run(functools.partial(_flat, n=len(inputs) - 2, flags=flags), q, k, inputs, inplace)
    return _run(_graph(_key(q, k, inputs, flags), inputs, flags), q, k, inputs, inplace)


def auto_op(
    q: torch.Tensor | None,
    k: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    **kw,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``rotary_op`` for a shape from its ``AUTO_AFTER``-th call on; the torch op (its numbers agree
    to float32 rounding, see the module doc) before that and once compiling has failed in this process."""
    if not FAILURE:
        inputs, flags = _plan(q, k, cos, sin, kw["rotary_dim"], kw.get("interleaved", False), kw.get("offsets"),
                              kw.get("cu_seqlens"), kw.get("conjugate", False), kw.get("seq_first", False))
        key = _key(q, k, inputs, flags)
        graph = _GRAPHS.get(key)
        if graph is None:
            if len(_SEEN) >= 4 * MAX_GRAPHS:
                _SEEN.clear()
            seen = _SEEN[key] = _SEEN.get(key, 0) + 1
            if seen >= AUTO_AFTER:
                try:
                    graph = _graph(key, inputs, flags)
                except CompileError:
                    graph = None
                _SEEN.pop(key, None)
        if graph is not None:
            _GRAPHS.move_to_end(key)
            return _run(graph, q, k, inputs, kw.get("inplace", False))
    return rotary_ops_torch.rotary_op(q, k, cos, sin, **kw)

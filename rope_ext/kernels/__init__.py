"""Kernels: the rotary ops (Triton and torch) with their autograd layer, and the two-part attention.

Nothing here knows about transformers or models, and nothing here imports from above this package.
The rotary is three thin layers, as in flash-attn's: ``rotary_ops_triton.rotary_op`` /
``rotary_ops_torch.rotary_op`` / ``rotary_ops_compiled.rotary_op`` (the ops: the computation, one
signature; the torch op also has transformers' rounding, ``rounding="each"``; the compiled op is one
inductor graph per shape, for the CPU), ``rotary_autograd.apply_op`` (argument checks, the
autograd Function and the backend table), and ``rope_ext.rotary.apply_rotary`` (the dispatcher users
call). ``two_part_merged`` is ReRoPE's near/far attention from two SDPA calls, ``two_part_reference``
its query-blocked reference. Triton is imported only when the Triton backend is first used.
"""
from .rotary_autograd import BACKENDS, RotaryFunction, apply_op, check_args

__all__ = ["BACKENDS", "RotaryFunction", "apply_op", "check_args"]

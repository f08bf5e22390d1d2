"""Kernels: fused rotary embedding (Triton, with a plain torch twin) and the merged two-part attention.

Nothing here knows about transformers or models. Three thin layers, as in flash-attn's rotary:
``rotary_triton.rotary_triton`` / ``rotary_torch.rotary_torch`` (the computation, one signature),
``rotary_apply.rotary`` (argument checks and the autograd Function), and
``rope_ext.rotary.apply_rotary`` (the public dispatcher). ``two_part_merged`` is ReRoPE's near/far
attention from two SDPA calls. Triton is imported only when the Triton backend is first used.
"""
from .rotary_apply import RotaryFunction, check_args, rotary

__all__ = ["RotaryFunction", "check_args", "rotary"]

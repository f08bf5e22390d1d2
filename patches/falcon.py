"""Falcon: its attention does not go through AttentionInterface, so only methods the rotary module
expresses (static frequency methods) apply; attention-level and deferred methods are refused."""
from __future__ import annotations

from .family import Family

FAMILY = Family("falcon", ("falcon",), attention_interface=False, notes="frequency methods only")

"""Lock-free SPSC rings (C++) that carry tokens and audio between the pipeline's threads.

``AudioRing`` holds float32 samples, ``TokenRing`` int32 token ids. Both take any 1-D C-contiguous
buffer of exactly their dtype without copying; anything else raises TypeError/ValueError.
See ``cpp_ext/spsc_ring.hpp`` for the memory-ordering design.
"""
from kimia_edge._native import AudioRing, RingClosedError, RingFullError, TokenRing

POLICIES = ("block", "drop_oldest", "raise")

__all__ = ["AudioRing", "TokenRing", "RingClosedError", "RingFullError", "POLICIES"]

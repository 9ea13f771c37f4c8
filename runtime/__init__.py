"""Run time: bundle loading, audio front end, sessions, LLM backend, streaming detokenizer, audio I/O.

Never imports torch, and nothing from ``kimia_edge.export`` or ``kimia_edge.quantization``.
"""

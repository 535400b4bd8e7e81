"""Serving: llama.cpp's server on a GGUF file (gguf.py), and a run's cascade as one endpoint (cascade.py)."""

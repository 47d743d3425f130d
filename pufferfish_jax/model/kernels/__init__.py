"""Attention kernels: our Pallas flash attention (GPU, or interpreted on CPU) and a splash wrapper (TPU).

Nothing here is imported by the model until a backend asks for it (`model/attention.py`), so a
platform without Pallas support pays nothing for it.
"""

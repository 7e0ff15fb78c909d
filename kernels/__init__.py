"""DAM attention kernels, installed as `dam_kernels` (a PyPI package named `kernels` exists).

Each kernel lives in its own file beside the PyTorch reference of the same signature.
"""

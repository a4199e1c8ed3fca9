"""The learning loop: what atlas learns from the traffic it serves.

``head``: the learned speculator's draft head (PyTorch twin of the native
forward), its weight export for pushes, and its distillation loss.
"""

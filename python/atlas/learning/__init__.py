"""The learning loop: what atlas learns from the traffic it serves.

* ``head``: the learned speculator's draft head (PyTorch twin of the native
  forward), its weight export for pushes, and its distillation loss;
* ``tap``: training examples from every target forward (an engine observer);
* ``replay``: the bounded replay buffer of examples, with a held-out slice;
* ``trainer``: the trainer, its held-out metric and gated pushes;
* ``process``: the trainer in a process of its own (the loop's default);
* ``checkpoint``: per-model checkpoint folders and atomic writes;
* ``loop``: :class:`LearningLoop`, the four together for one speculator;
* ``distill``: the static head, distilled offline (``atlas distill``).
"""
from .checkpoint import cache_root, load_checkpoint, model_dir, save_checkpoint
from .distill import distill, load_static, static_head
from .head import DraftHead, choose_draft_vocab, distillation_loss
from .loop import LearningLoop
from .process import TrainerProcess
from .replay import ReplayBuffer
from .tap import Examples, Tap
from .trainer import Trainer

__all__ = ["DraftHead", "Examples", "LearningLoop", "ReplayBuffer", "Tap", "Trainer", "TrainerProcess",
           "cache_root", "choose_draft_vocab", "distill", "distillation_loss", "load_checkpoint", "load_static",
           "model_dir", "save_checkpoint", "static_head"]

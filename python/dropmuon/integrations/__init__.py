"""Integrations with training frameworks. Each lives in a module of its own that imports its
framework, so ``import dropmuon`` (and this package) needs none of them:

- :mod:`dropmuon.integrations.huggingface`: ``DropMuonCallback`` for ``transformers.Trainer``.

Lightning needs no integration: ``configure_optimizers`` returns a DropMuon (README recipe).
"""


def __getattr__(name):
    if name == "DropMuonCallback":  # imports transformers only when asked for
        from .huggingface import DropMuonCallback

        return DropMuonCallback
    raise AttributeError(f"module 'dropmuon.integrations' has no attribute {name!r}")

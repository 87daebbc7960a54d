"""Access to the compiled kernels: typed wrappers over ``torch.ops.dropmuon.*`` with routing to
the pure-PyTorch references (:mod:`.ops`), and those references, the oracle (:mod:`.reference`)."""

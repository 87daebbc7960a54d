"""The comparison harness: trains one model with several optimizers under the same budget and
reports time to accuracy (``python -m dropmuon.compare`` or ``dropmuon-compare``).

- ``cli``: the command line and the comparison (runs, outputs);
- ``train``: the optimizers compared and one timed training run;
- ``data``: the datasets, held in memory as tensors (the shipped MNIST-10k in ``datasets/``);
- ``models``: the paper's CNN and a ResNet-18-style CNN;
- ``report``: ``runs.csv``, ``summary.md`` and the plots.

Its own requirements (matplotlib, tqdm) come with ``pip install dropmuon[compare]``; the
library needs torch alone and ``import dropmuon`` never imports this package. Importing a
module here imports only what that module uses: ``models`` and ``data`` need torch alone.
"""

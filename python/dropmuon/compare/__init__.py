"""The comparison harness: trains one model with several optimizers under the same budget and
reports time to a target with paired speedups and their confidence intervals
(``python -m dropmuon.compare`` or ``dropmuon-compare``).

- ``cli``: the command line;
- ``experiment``: the sweep on the validation split, the final runs, their files and resume;
- ``train``: the optimizers compared and one timed training run;
- ``tasks``: the splits (train, validation, test) and the metrics of images and text;
- ``data``, ``text``: the image datasets (the shipped MNIST-10k in ``datasets/``) and the text
  corpora (Debian's ``fortunes``, a synthetic text), held in memory as tensors;
- ``models``: the paper's CNN, a ResNet-18-style CNN, a small ViT and a character-level GPT;
- ``stats``: time to a target, bootstrap intervals, the learning-rate selection;
- ``report``, ``plots``: ``runs.csv``, ``sweep.csv``, ``summary.md`` and the plots.

Its own requirements (matplotlib, tqdm) come with ``pip install dropmuon[compare]``; the
library needs torch alone and ``import dropmuon`` never imports this package. Importing a
module here imports only what that module uses: ``models``, ``data`` and ``text`` need torch
alone.
"""

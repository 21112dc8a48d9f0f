"""An independent check of probe.py's converged head: scikit-learn's logistic regression on
the very features probe.py extracts (its own run, same flags), C picked on a held-out tenth of the
training images and refitted on all. Needs `pip install scikit-learn` (a measurement, not a
dependency).

    python .ci/sklearn_probe.py --ckpt runs/X/ckpt.pt --init --raw-pixels   # probe.py's flags

Prints probe.py's report as usual, and per cell a line "sklearn: <cell> test <acc>% (C=...)".
"""
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import probe  # noqa: E402

C_GRID = [1e-3, 1e-2, 1e-1, 1, 10, 100, 1e3, 1e4]  # probe.py's L2 path spans C up to 5e3 here

def fit(X, Y, C):
    """Standardised multinomial logistic regression at inverse strength C."""
    s = StandardScaler().fit(X)
    m = LogisticRegression(C=C, max_iter=5000).fit(s.transform(X), Y)
    return lambda Z: m.predict(s.transform(Z))

def sklearn_probe(cell, train, test):
    """(test accuracy %, C) of cell: every view of each training image is a row; the held-out
    tenth is of images, so an image's flips stay on one side."""
    n = len(train.y)
    X = np.concatenate([train.feats(cell, torch.arange(n), v).numpy()
                        for v in range(train.views)])
    Y, img = np.tile(train.y.numpy(), train.views), np.tile(np.arange(n), train.views)
    hold = np.zeros(n, bool)
    hold[np.random.default_rng(0).permutation(n)[:n // 10]] = True
    h = hold[img]
    held = {C: (fit(X[~h], Y[~h], C)(X[h]) == Y[h]).mean() for C in C_GRID}
    C = max(C_GRID, key=lambda c: (held[c], -c))  # ties: the stronger regularisation
    Xt = test.feats(cell, torch.arange(len(test.y)), 0).numpy()
    return 100 * (fit(X, Y, C)(Xt) == test.y.numpy()).mean(), C

def cells(*args, **kwargs):
    """probe.cells, and beside each cell the sklearn figure on its features."""
    for cell, train, test in _cells(*args, **kwargs):
        acc, C = sklearn_probe(cell, train, test)
        print(f"sklearn: {cell} test {acc:.2f}% (C={C:g})", flush=True)
        yield cell, train, test

if __name__ == "__main__":
    _cells, probe.cells = probe.cells, cells
    probe.main()

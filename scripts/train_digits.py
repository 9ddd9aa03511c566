#!/usr/bin/env python
"""Main job: differentially private training of a small CNN on scikit-learn's digits data set.

The digits data (1,797 8x8 grayscale images of handwritten digits, 10 classes) ship with scikit-learn, so this
runs offline. The script trains the same CNN twice from the same initial weights:

1. non-private: ordinary PyTorch (shuffled mini-batches), as a reference (skip with --no-baseline);
2. private: DP-SGD through ``dpclip.PrivacyEngine.make_private_with_epsilon`` at (--epsilon, --delta), with
   Poisson sampling, per-example clipping (L2 + Gaussian noise, or L1 + Laplace noise) and RDP accounting.

It prints both test accuracies side by side and the privacy statement, and writes to --out:
``privacy_report.json`` (the engine's privacy report plus accuracies, hyper-parameters and wall time),
``model.pt`` (state_dict of the private model) and ``checkpoint.pt`` (the engine's state_dict, to resume).

The code lives in the installed package ``dpclip_examples`` (``pip install -e .``, or ``make run``):
:mod:`dpclip_examples.train_digits` (this job) and :mod:`dpclip_examples.digits` (data, model, helpers).

    python scripts/train_digits.py                       # ε = 3, δ = 1e-5, L2 / fixed clipping
    python scripts/train_digits.py --norm l1 --clipping median
    python scripts/train_digits.py --quick --out /tmp/digits
"""

from dpclip_examples.train_digits import main

if __name__ == "__main__":
    main()

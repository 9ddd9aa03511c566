"""The examples' shared code: the models, data loaders and training jobs behind ``scripts/``, the notebooks,
the benchmarks and the tests.

Installed with dpclip (``pip install -e .``), so everything imports it by name — nothing edits the import path.
Submodules are not imported here: each pulls in only what it needs (scikit-learn, transformers and peft are
imported lazily, inside the functions that use them).

- :mod:`dpclip_examples.digits`: scikit-learn's digits data, the digits CNN and small training helpers
  (accuracy, optimizer, learning-rate schedule, weight averaging);
- :mod:`dpclip_examples.train_digits`: the main job (``python scripts/train_digits.py``): its command line, the
  non-private and private training runs, the report;
- :mod:`dpclip_examples.text`: Rotten Tomatoes / user data, the pretrained encoder + head, sentence embeddings;
- :mod:`dpclip_examples.finetune_text`: private fine-tuning of the encoder (``python scripts/finetune_text.py``);
- :mod:`dpclip_examples.finetune_lm`: a tiny GPT-2 pretrained on BBC News, fine-tuned privately on Rotten
  Tomatoes with LoRA or in full (``python scripts/finetune_lm.py``);
- :mod:`dpclip_examples.train_distributed`: the digits CNN over several processes
  (``torchrun scripts/train_distributed.py``).

Each job also runs as ``python -m dpclip_examples.<job>`` with the same flags as its script.
"""

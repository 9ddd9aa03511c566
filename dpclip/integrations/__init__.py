"""Integrations of dpclip with other training libraries.

Each integration lives in its own module and imports its library only there, so ``import dpclip`` never needs it:

- :mod:`dpclip.integrations.transformers`: :class:`~dpclip.integrations.transformers.DPTrainer`, a drop-in
  ``transformers.Trainer`` that trains with DP-SGD through :class:`dpclip.PrivacyEngine`
  (``pip install transformers``).
"""

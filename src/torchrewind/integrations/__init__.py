"""Optional integrations with training frameworks; each submodule imports its framework only when imported itself.

* ``torchrewind.integrations.hf``: Hugging Face ``Trainer`` (``pip install torchrewind[hf]``).
* ``torchrewind.integrations.lightning``: PyTorch Lightning (``pip install torchrewind[lightning]``).
"""

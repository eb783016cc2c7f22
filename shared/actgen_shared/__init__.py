"""ActGen as a service: the wire contract shared by the generator and the trainer.

Kept light on purpose: nothing here imports torch, so the contract can be used by
any client. Heavy pieces (the classifier registry) import torch lazily.
"""

__version__ = "0.1.0"

"""capsnet: capsule networks in PyTorch.

Dynamic routing between capsules (Sabour, Frosst & Hinton 2017) and matrix capsules
with EM routing (Hinton, Sabour & Frosst 2018).
"""

from capsnet import functional

__version__ = "0.1.0"

__all__ = ["functional", "__version__"]

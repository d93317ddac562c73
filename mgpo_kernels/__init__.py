"""mgpo_kernels: fused kernels for LoRA-MGPO (AdamW + momentum-guided perturbation) as a torch optimizer."""
from .backends import available_backends, backend_reasons
from .optimizer import MGPO

__version__ = "0.1.0"
__all__ = ["MGPO", "available_backends", "backend_reasons", "__version__"]

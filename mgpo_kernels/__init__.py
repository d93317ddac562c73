"""mgpo_kernels: fused kernels for LoRA-MGPO (AdamW + momentum-guided perturbation) as a torch optimizer."""
from .backends import MGPOFallbackWarning, available_backends, backend_reasons
from .optimizer import MGPO
from .integrations.common import find_mgpo

__version__ = "0.2.0"
__all__ = ["MGPO", "MGPOFallbackWarning", "find_mgpo", "available_backends", "backend_reasons", "__version__"]

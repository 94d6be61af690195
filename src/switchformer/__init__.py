"""switchformer: Switch Transformers (sparse mixture-of-experts) in PyTorch."""

from switchformer.moe import MoEAux, SwitchMoE
from switchformer.routing import load_balancing_loss, router_z_loss

__version__ = "0.1.0"

__all__ = ["SwitchMoE", "MoEAux", "load_balancing_loss", "router_z_loss", "__version__"]

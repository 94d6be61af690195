"""switchformer: Switch Transformers (sparse mixture-of-experts) in PyTorch."""

from switchformer.moe.layer import MoEAux, SwitchMoE
from switchformer.moe.routing import load_balancing_loss, router_z_loss

__version__ = "0.1.0"

_LAZY = {
    "SwitchT5": "switchformer.models",
    "SwitchT5Config": "switchformer.models",
    "SwitchLM": "switchformer.models",
    "SwitchLMConfig": "switchformer.models",
    "dense_twin_config": "switchformer.models",
    "from_hf": "switchformer.interop.hf",
    "to_hf": "switchformer.interop.hf",
}


def __getattr__(name: str):
    # Models and interop load on first use, so `import switchformer` stays light.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'switchformer' has no attribute {name!r}")


__all__ = ["SwitchMoE", "MoEAux", "load_balancing_loss", "router_z_loss", "__version__", *_LAZY]

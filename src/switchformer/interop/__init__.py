"""Checkpoint interop with Hugging Face ``transformers``."""

from switchformer.interop.hf import from_hf, to_hf

__all__ = ["from_hf", "to_hf"]

"""Hugging Face ``transformers`` checkpoints, read and written without transformers: configs
(:mod:`hf_config`), weights (:mod:`hf_weights`), ``from_hf``/``to_hf`` (:mod:`hf`), the tokenizer
as switchformer uses it (:mod:`tokenizers`) and the files of a whole model directory
(:mod:`hf_export`)."""

from switchformer.interop.hf import from_hf, to_hf

__all__ = ["from_hf", "to_hf"]

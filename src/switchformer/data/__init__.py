"""Data: the embedded corpus, user files, tokenizers and training objectives."""

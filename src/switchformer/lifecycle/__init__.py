"""What turns one checkpoint into another: :mod:`~switchformer.lifecycle.convert` (a Hugging Face
directory into a run and back), :mod:`~switchformer.lifecycle.upcycle` (a dense checkpoint into a
Switch model, Komatsuzaki et al. 2022) and :mod:`~switchformer.lifecycle.distill` (a Switch model
into a dense one, Switch paper section 5.2)."""

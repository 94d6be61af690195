"""Serving Switch models over an OpenAI-compatible HTTP API (the ``serve`` extra).

- :mod:`~switchformer.serve.sampling`: one request's sampling settings, next-token choice,
  stop strings and incremental detokenisation;
- :mod:`~switchformer.serve.engine`: the continuous-batching scheduler that owns the model;
- :mod:`~switchformer.serve.protocol`: OpenAI request fields checked, responses and stream chunks;
- :mod:`~switchformer.serve.app`: the FastAPI application, a thin layer over the engine;
- :mod:`~switchformer.serve.command`: ``switchformer serve``.

Only ``app`` and ``command`` import FastAPI and uvicorn; the engine needs PyTorch alone.
"""

"""Serving Switch models over an OpenAI-compatible HTTP API (the ``serve`` extra).

- :mod:`~switchformer.serve.sampling`: one request's sampling settings, next-token choice,
  stop strings and incremental detokenisation;
- :mod:`~switchformer.serve.engine`: the continuous-batching scheduler that owns the model;
- :mod:`~switchformer.serve.protocol`: OpenAI request fields checked, responses and stream chunks;
- :mod:`~switchformer.serve.app`: the FastAPI application, a thin layer over the engine;
- :mod:`~switchformer.serve.server`: a source loaded into the engine and the application, served
  by uvicorn (``switchformer serve`` is :mod:`switchformer.commands.serve`).

Only ``app`` and ``server`` import FastAPI and uvicorn (``server`` on use); the engine needs PyTorch
alone.
"""

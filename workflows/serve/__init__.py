"""Serving embeddings over an OpenAI-compatible HTTP API with Ray Serve.

``config`` (ServeConfig), ``auth`` and ``limits`` are pure and reusable by other HTTP services;
``app`` builds the Serve application, ``model_server`` is the multiplexed, batching model
deployment, ``run`` starts it for ``jobs.serve``.
"""

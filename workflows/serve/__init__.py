"""Serving embeddings over an OpenAI-compatible HTTP API with Ray Serve.

``config`` (ServeConfig), ``auth``, ``limits`` and ``endpoint`` are pure and reusable by other HTTP
services (the debate app imports only these);
``app`` builds the Serve application, ``model_server`` is the multiplexed, batching model
deployment, ``run`` starts it for ``jobs.serve``.
"""

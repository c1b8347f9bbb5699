"""CIPHER debate: agents that exchange expected embeddings, natural-language baselines, a Serve app
and an evaluation (``protocol`` and ``cipher`` are pure; ``app`` and ``evaluate`` use Ray)."""

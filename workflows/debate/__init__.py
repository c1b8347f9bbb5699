"""CIPHER debate: agents that exchange expected embeddings, natural-language baselines, a Serve app
and an evaluation (``protocol`` is pure, with CIPHER's math in ``embedforge.cipher`` and the message types in
``embedforge.dialogue``, shared with the agents in ``actors/``; ``app`` and ``evaluate`` use Ray)."""

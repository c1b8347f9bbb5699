"""Rewards and teacher labels: hard-negative mining, LLM-feedback rewards, an LLM cross-encoder.

* :mod:`.mining` embeds a corpus and queries with an embedder actor pool (Ray Data) and keeps
  each query's nearest non-positive passages (faiss);
* :mod:`.scoring` is the pure math: mean log-prob rewards, per-query ``softmax(r / T)`` teacher
  distributions, expected scores over score tokens;
* :mod:`.prompts` builds the prompts (no Ray, no model);
* :mod:`.pipeline` (:func:`run_reward`) composes them and commits sharded outputs with a manifest.
"""

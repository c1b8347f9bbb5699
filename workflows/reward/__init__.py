"""Rewards and teacher labels: hard-negative mining, LLM-feedback rewards, an LLM cross-encoder.

* :mod:`.mining` embeds a corpus and queries with an embedder actor pool (Ray Data) and keeps
  each query's nearest non-positive passages (faiss);
* :mod:`.scoring` is the pure teacher math: per-query ``softmax(r / T)`` distributions, Spearman;
* the scorer (:mod:`actors.reward_scorer`) builds the prompts and scores pairs with vLLM;
* :mod:`.pipeline` (:func:`run_reward`) composes them and commits sharded outputs with a manifest.
"""

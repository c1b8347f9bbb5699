"""Evaluation stage: multilingual STS, bitext mining, retrieval, the 2DMSE grid, a report and a gate.

Entry point: :func:`workflows.evaluate.run.run_evaluate` (``python -m jobs.evaluate --config ...``).
"""

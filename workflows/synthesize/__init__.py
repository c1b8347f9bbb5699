"""Synthesize: translate English NLI triplets and STS pairs into target languages with vLLM on Ray Data.

Modules: ``config`` (SynthesizeConfig), ``prompts`` and ``qe`` (pure prompt building and quality
estimation), ``rows`` (pure row bookkeeping), ``stages`` (Ray Data stages), ``pipeline``
(``run_synthesize``), ``report`` (summary table and plot). Heavy parts import lazily.
"""

from workflows.synthesize.config import QEConfig, SynthesizeConfig, TranslationConfig


def run_synthesize(config: SynthesizeConfig) -> dict:
    from workflows.synthesize.pipeline import run_synthesize as run

    return run(config)


__all__ = ["QEConfig", "SynthesizeConfig", "TranslationConfig", "run_synthesize"]

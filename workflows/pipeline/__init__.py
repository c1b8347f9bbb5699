"""The end-to-end pipeline (the main job): synthesize -> reward -> train -> gate -> evaluate -> deploy."""

from workflows.pipeline.config import PipelineConfig

__all__ = ["PipelineConfig"]

"""``TrainConfig``: what to fine-tune, on which mixture of datasets, with which objectives, where.

A run trains one sentence-transformers model on a mixture of datasets, each with its own
objective (``workflows.train.losses.ObjectiveConfig``, a union tagged by ``kind``). Every step
draws one global batch from one dataset (round-robin or proportional to ``weight``), split
evenly across the Ray Train workers. Example (``configs/train.yaml``)::

    model: {base: all-minilm-l6-v2}
    datasets:
      - dataset: {source: stsb, split: train}
        objective: {kind: cosent}
    train: {batch_size: 16, max_steps: 50, lr: 2.0e-5}
    scaling: {num_workers: 2}
    output: runs/train-minilm

Phases instead of one mixture (``configs/train_phases.yaml``): the phases run one after the other
in the same run, each with its own mixture, steps and optimizer (a fresh AdamW and warmup, as two
consecutive ``fit`` calls would have), e.g. NLI first, then STS::

    phases:
      - name: nli
        datasets: [{dataset: {source: sick, split: train, kind: nli_triplets}, objective: {kind: mnrl}}]
        train: {batch_size: 16, epochs: 1}
      - name: sts
        datasets: [{dataset: {source: stsb, split: train}, objective: {kind: cosent}}]
        train: {batch_size: 16, epochs: 4}
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from embedforge.config import StrictModel
from embedforge.data import DatasetSpec
from embedforge.runtime import RayConfig
from workflows.train.losses import ObjectiveConfig


class LoraSettings(StrictModel):
    """LoRA adapters (peft) on the decoder's linear layers; the exported model has them merged."""

    r: int = Field(16, ge=1, le=1024, description="Adapter rank")
    alpha: float = Field(32, gt=0, description="lora_alpha: the update is scaled by alpha / r")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter's input")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt (e.g. [q_proj, v_proj]); all-linear: every linear layer")


class MultiLayerPoolingSettings(StrictModel):
    """``pooling: multilayer_trainable`` (embedforge.st_modules.MultiLayerTrainablePooling)."""

    layer_summary: Literal["lasttoken", "mean"] = Field(
        "lasttoken", description="Vector per layer: lasttoken (the paper's code) or the masked mean (not the paper's)")
    num_latents: int = Field(768, ge=1, le=8192, description="Learned latent queries (official: 768)")
    num_heads: int = Field(8, ge=1, le=256, description="Attention heads (official resampler: 32)")
    head_dim: int = Field(64, ge=1, le=4096, description="Width per head (official resampler: 2048)")
    ff_mult: int = Field(4, ge=1, le=16, description="GEGLU feed-forward width multiple (official: 4)")


class DecoderSettings(StrictModel):
    """How a decoder LLM (a causal-LM folder or hub id) becomes a sentence-transformers embedder."""

    append_eos: bool = Field(True, description="Append the EOS token to every input (the token last-token "
                                                "pooling reads); saved into the tokenizer, so serving does it too")
    padding_side: Literal["left", "right"] = Field(
        "right", description="Side the tokenizer pads (pooling finds the last real token on either side)")
    lora: LoraSettings | None = Field(None, description="Train LoRA adapters (peft) instead of every weight")
    bidirectional: bool = Field(
        False, description="Not implemented yet: refused (LLM2Vec's bidirectional attention needs a patched "
                           "attention mask in transformers and vLLM's LlamaBidirectionalModel at serving)")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward (memory for time)")

    @model_validator(mode="after")
    def _check(self) -> DecoderSettings:
        if self.bidirectional:
            raise ValueError("model.decoder.bidirectional: not implemented yet; set it to false")
        return self


class ModelConfig(StrictModel):
    """The model to start from."""

    base: str = Field("all-minilm-l6-v2", description="Packaged short name, local folder, s3:// folder or hub id")
    pooling: Literal["keep", "mean", "cls", "lasttoken", "multilayer_attention", "multilayer_trainable"] = Field(
        "keep", description="keep: the base model's own pooling; otherwise replace it (multilayer_attention: "
                            "embedforge's residual cross-attention over all layers; multilayer_trainable: the "
                            "Pooling-and-Attention paper's module as its code defines it)")
    multilayer: MultiLayerPoolingSettings = Field(
        default_factory=MultiLayerPoolingSettings, description="Settings of pooling: multilayer_trainable")
    max_seq_length: int | None = Field(None, ge=8, le=8192, description="Truncate inputs; None: the model's")
    freeze_unused: bool = Field(True, description="Freeze parameters no loss reaches (e.g. the BERT pooler)")
    decoder: DecoderSettings | None = Field(
        None, description="Set when `base` is a decoder LLM (causal LM, no sentence-transformers config): wraps "
                          "it as an embedder (EOS appended, padding side, optional LoRA); needs a pooling other "
                          "than keep")
    prompts: dict[str, str] = Field(
        default_factory=dict, description="Prompts saved with the model (sentence-transformers `prompts`), e.g. "
                                          "{query: 'Instruct: Retrieve semantically similar text.\\nQuery: '}")
    default_prompt_name: str | None = Field(
        None, description="Prompt the saved model prepends by default (encode and serving); a key of `prompts`")

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.decoder is not None and self.pooling == "keep":
            raise ValueError("model.pooling: a decoder LLM has no sentence pooling to keep; choose lasttoken, "
                             "mean or multilayer_trainable")
        if self.default_prompt_name is not None and self.default_prompt_name not in self.prompts:
            raise ValueError(f"model.default_prompt_name {self.default_prompt_name!r} is not a key of model.prompts "
                             f"({', '.join(self.prompts) or 'empty'})")
        return self


class MixtureItem(StrictModel):
    """One training dataset and the objective it trains."""

    dataset: DatasetSpec | str = Field(
        description="A DatasetSpec (named dataset, split, limit), or the URI of a committed output of the "
                    "synthesize or reward stage (its `data` rows)")
    output: str = Field("data", description="For a committed stage output: which sub-output to read "
                                             "(synthesize: data, or parallel for multilingual_distill; reward: "
                                             "sts_teacher, or feedback for kl_distill)")
    kind: Literal["scored_pairs", "nli_triplets"] | None = Field(
        None, description="For a committed stage output whose rows mix kinds (synthesize writes scored pairs "
                          "and NLI triplets into one `data` output, with a `kind` column): train on this kind only")
    objective: ObjectiveConfig = Field(description="Loss for this dataset, tagged by `kind`")
    weight: float = Field(1.0, gt=0, description="Share of steps in proportional mode")
    name: str | None = Field(None, description="Name in logs and the model card; default: source and split")
    prompts: dict[str, str] = Field(
        default_factory=dict, description="Text prepended to an input column of this dataset, e.g. E5-Mistral's "
                                          "query instruction {anchor: 'Instruct: Given a question, retrieve "
                                          "passages that answer it\\nQuery: '}; columns the objective reads")

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if isinstance(self.dataset, str):
            return self.dataset.rstrip("/").rsplit("/", 1)[-1]
        return f"{self.dataset.source}:{self.dataset.split}"


class OptimConfig(StrictModel):
    """Steps, batch and optimizer."""

    batch_size: int = Field(16, ge=1, le=65536, description="Rows per worker per step (global = x num_workers)")
    lr: float = Field(2e-5, gt=0, le=1.0, description="AdamW peak learning rate")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="Share of steps with linear warmup")
    max_steps: int | None = Field(None, ge=1, description="Total optimizer steps (set this or epochs)")
    epochs: float | None = Field(None, gt=0, description="Passes over the mixture (set this or max_steps)")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping; None: off")
    mixture: Literal["round_robin", "proportional"] = Field(
        "proportional", description="round_robin: datasets in turn; proportional: drawn by weight each step")
    log_every_n_steps: int = Field(10, ge=1, description="Rank 0 logs (and reports) every N steps")

    @model_validator(mode="after")
    def _one_length(self) -> OptimConfig:
        if (self.max_steps is None) == (self.epochs is None):
            raise ValueError("set exactly one of train.max_steps and train.epochs")
        return self


class PhaseConfig(StrictModel):
    """One phase of a phased run: its own mixture, length and optimizer."""

    name: str = Field(pattern=r"^[A-Za-z0-9][\w.-]*$", description="Phase name (logs, history, model card)")
    datasets: list[MixtureItem] = Field(min_length=1, description="This phase's training mixture")
    train: OptimConfig = Field(description="This phase's steps, batch and optimizer (a fresh AdamW and warmup)")

    @model_validator(mode="after")
    def _distinct(self) -> PhaseConfig:
        labels = [item.label for item in self.datasets]
        if len(set(labels)) != len(labels):
            raise ValueError(f"phase {self.name}: dataset names {labels} repeat; give each item a distinct `name`")
        return self


class ScalingConfig(StrictModel):
    """Ray Train workers."""

    num_workers: int = Field(2, ge=1, le=4096, description="Data-parallel workers")
    use_gpu: bool = Field(False, description="One GPU per worker (NCCL); False: CPU workers (gloo)")
    cpus_per_worker: float = Field(1, gt=0, description="CPUs each worker asks for (its torch threads)")
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict, description="Extra custom resources per worker, e.g. {'accelerator_type:A10G': 0.01}")


class DevConfig(StrictModel):
    """The dev set that scores checkpoints (STS Spearman of cosine similarity)."""

    dataset: DatasetSpec | None = Field(
        default_factory=lambda: DatasetSpec(source="stsb", split="dev"),
        description="Scored pairs to evaluate on (never a test split); None: no dev metric")
    batch_size: int = Field(64, ge=1, description="Encoding batch size")
    prompt: str | None = Field(None, description="Text prepended to both dev sentences (a symmetric STS "
                                                   "instruction); None: the model's default prompt")


class CheckpointConfig(StrictModel):
    """Checkpoints in storage, each a loadable sentence-transformers folder plus optimizer state."""

    every_n_steps: int = Field(100, ge=1, description="Checkpoint (and evaluate on dev) every N steps and at the end")
    keep_best_k: int = Field(2, ge=1, description="Checkpoints kept, best by the dev metric")
    metric: Literal["dev_spearman", "train_loss"] = Field(
        "dev_spearman", description="Reported metric that ranks checkpoints: dev_spearman (mode max) or "
                                    "train_loss (mode min; the mean over the steps since the last report)")
    mode: Literal["max", "min"] = Field("max", description="Whether a higher metric is better")
    export: Literal["best", "last"] = Field("best", description="Which checkpoint becomes the exported model")


class FailureConfig(StrictModel):
    max_failures: int = Field(2, ge=-1, description="Worker-group restarts from the last checkpoint (-1: unlimited)")


class TrainConfig(StrictModel):
    """Fine-tune a sentence embedder on Ray Train over a mixture of datasets and objectives."""

    model: ModelConfig = Field(default_factory=ModelConfig, description="Base model and pooling")
    datasets: list[MixtureItem] | None = Field(
        None, min_length=1, description="The training mixture (or set `phases`)")
    train: OptimConfig | None = Field(None, description="Steps, batch and optimizer (with `datasets`)")
    phases: list[PhaseConfig] | None = Field(
        None, min_length=1, description="Phases run one after the other, each with its own datasets and train "
                                        "settings; instead of top-level `datasets` and `train`")
    scaling: ScalingConfig = Field(default_factory=ScalingConfig, description="Ray Train workers")
    dev: DevConfig = Field(default_factory=DevConfig, description="Dev set that scores checkpoints")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="Checkpointing")
    failure: FailureConfig = Field(default_factory=FailureConfig, description="Fault tolerance")
    output: str = Field(description="URI (local path or s3://bucket/prefix) of the run: checkpoints and model")
    run_name: str = Field("train", pattern=r"^[A-Za-z0-9][\w.-]*$",
                          description="Run name; rerunning with the same name and output resumes it")
    seed: int = Field(0, description="Seed of data order and initialization")
    ray: RayConfig = Field(default_factory=RayConfig, description="How to reach Ray")

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        from embedforge.data import is_test_split

        if self.phases is None:
            if self.datasets is None or self.train is None:
                missing = " and ".join(k for k in ("datasets", "train") if getattr(self, k) is None)
                raise ValueError(f"{missing}: required (or give `phases`, each with its own datasets and train)")
        elif self.datasets is not None or self.train is not None:
            raise ValueError("phases: each phase has its own datasets and train; remove the top-level "
                             "`datasets` and `train`")
        names = [phase.name for phase in self.phase_list()]
        if len(set(names)) != len(names):
            raise ValueError(f"phases: names {names} repeat; give each phase a distinct `name`")
        where = "datasets" if self.phases is None else "phases[{p}].datasets"
        for p, phase in enumerate(self.phase_list()):
            for i, item in enumerate(phase.datasets):
                if isinstance(item.dataset, DatasetSpec) and is_test_split(item.dataset):
                    raise ValueError(f"{where.format(p=p)}[{i}] ({item.label}): test splits are for final "
                                     "evaluation only; train on train or dev splits")
        from workflows.train.losses import input_columns

        for p, phase in enumerate(self.phase_list()):
            for i, item in enumerate(phase.datasets):
                extra = sorted(set(item.prompts) - set(input_columns(item.objective)))
                if extra:
                    raise ValueError(f"{where.format(p=p)}[{i}] ({item.label}).prompts: columns {extra} are not "
                                     f"read by objective {item.objective.kind} (it reads "
                                     f"{input_columns(item.objective)})")
        if self.dev.dataset is not None and is_test_split(self.dev.dataset):
            raise ValueError("dev.dataset: checkpoints are selected on it, so it must not be a test split; use dev")
        labels = [item.label for item in self.datasets or []]
        if len(set(labels)) != len(labels):
            raise ValueError(f"datasets: names {labels} repeat; give each item a distinct `name`")
        if self.dev.dataset is None and self.checkpoint.metric.startswith("dev_"):
            raise ValueError("checkpoint.metric ranks by a dev metric but dev.dataset is None; "
                             "set dev.dataset or checkpoint.metric=train_loss with mode=min")
        return self

    def phase_list(self) -> list[PhaseConfig]:
        """The phases to run: ``phases``, or one phase named ``train`` made of ``datasets`` and ``train``."""
        if self.phases is not None:
            return list(self.phases)
        return [PhaseConfig(name="train", datasets=self.datasets, train=self.train)]

    def items(self) -> list[MixtureItem]:
        """Every phase's mixture items, in order (the loop indexes datasets by position in this list)."""
        return [item for phase in self.phase_list() for item in phase.datasets]

    def item_labels(self) -> list[str]:
        """Names of ``items()``: the item's label, prefixed ``<phase>/`` in a phased run."""
        if self.phases is None:
            return [item.label for item in self.datasets]
        return [f"{phase.name}/{item.label}" for phase in self.phases for item in phase.datasets]

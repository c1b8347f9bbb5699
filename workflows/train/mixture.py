"""The training mixture: load and check every dataset, then say which rows each worker trains on.

Pure logic, no Ray, except the teacher embeddings of ``multilingual_distill`` items
(:mod:`workflows.train.teacher`, one Ray Data job per new teacher x data). Data placement: the driver loads each (small) dataset once, checks it
against its objective, and hands the tables to the workers through the object store; each
worker then picks its own rows for a step from a seeded permutation. This keeps the data order
a pure function of ``(seed, step, rank)``, so resuming after a worker failure or a job restart
needs nothing but the step number (no iterator state to checkpoint), the mixture schedule is
the same on every rank (all ranks must run the same objective each step), and no Ray Data
pipeline runs beside the training processes on a small CPU box. Datasets far larger than
memory would call for ``ray.train.get_dataset_shard`` instead.

Schedule: step ``s`` trains on one dataset (``round_robin``: datasets in turn;
``proportional``: drawn with probability proportional to ``weight`` by an RNG seeded with
``(seed, s)``). The ``c``-th global batch of a dataset with ``n`` rows is slice ``c mod (n // G)``
of the permutation of epoch ``c // (n // G)`` (``G`` = batch_size x num_workers); rank ``r``
takes rows ``[r*b, (r+1)*b)`` of it. Incomplete last batches are dropped.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from embedforge import schemas as S
from embedforge.errors import InputError
from workflows.train.config import MixtureItem, TrainConfig
from workflows.train.hard_negatives import FEEDBACK_NEGATIVE_COLUMNS, feedback_negatives
from workflows.train.losses import required_columns

log = logging.getLogger(__name__)


@dataclass
class LoadedDataset:
    """One mixture item, loaded and checked."""

    label: str
    table: pa.Table
    columns: list[str]
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return self.table.num_rows


def load_item(item: MixtureItem) -> tuple[pa.Table, dict[str, Any]]:
    """Rows of one mixture item and the manifest describing where they came from."""
    from embedforge import storage
    from embedforge.data import DatasetSpec, forbid_test_split, load_dataset

    if isinstance(item.dataset, DatasetSpec):
        forbid_test_split(item.dataset, "training")
        df = load_dataset(item.dataset)
        if not hasattr(df, "to_arrow"):
            raise InputError(f"dataset {item.label}: a {type(df).__name__} cannot be trained on directly; "
                             "use a pairs, triplets or scored-pairs source")
        return df.to_arrow(), {"source": item.dataset.model_dump(mode="json")}
    manifest = storage.read_manifest(item.dataset)
    if item.output in manifest.get("outputs", {}):
        table = storage.read_output(item.dataset, item.output)
    elif "files" in manifest and item.output == "data":
        table = storage.read_committed_table(item.dataset)
    else:
        raise InputError(f"dataset {item.label}: {item.dataset} has no sub-output {item.output!r}; its manifest "
                         f"lists {sorted(manifest.get('outputs', {}))}; set `output` to one of them")
    info = {"uri": item.dataset, "output": item.output, "manifest": manifest}
    if item.kind is not None:
        if "kind" not in table.column_names:
            raise InputError(f"dataset {item.label}: `kind: {item.kind}` filters rows by their `kind` column, "
                             f"but {item.dataset} has none (columns {table.column_names}); remove `kind`")
        import pyarrow.compute as pc

        table = table.filter(pc.equal(table.column("kind"), item.kind))
        info["kind"] = item.kind
    if item.objective.kind in ("mnrl", "cached_mnrl") and item.objective.num_negatives > 0 \
            and FEEDBACK_NEGATIVE_COLUMNS <= set(table.column_names) and "anchor" not in table.column_names:
        table, dropped = feedback_negatives(table, item.objective.num_negatives)
        info["pivot"] = {"queries": table.num_rows, "dropped_queries_too_few_negatives": dropped}
        if dropped:
            log.warning("dataset %s: %d queries have fewer than %d mined negatives and are not trained on",
                        item.label, dropped, item.objective.num_negatives)
    if item.objective.kind == "kl_distill" and FEEDBACK_COLUMNS <= set(table.column_names) \
            and "query" not in table.column_names:
        table, dropped = pivot_feedback(table, item.objective.num_candidates)
        info["pivot"] = {"queries": table.num_rows, "dropped_queries_too_few_candidates": dropped}
        if dropped:
            log.warning("dataset %s: %d queries have fewer than %d candidates and are not trained on",
                        item.label, dropped, item.objective.num_candidates)
    return table, info


FEEDBACK_COLUMNS = {"qid", "question", "passage", "rank", "teacher_prob"}


def pivot_feedback(table: pa.Table, k: int) -> tuple[pa.Table, int]:
    """Reward feedback rows (one per query x passage) -> one row per query with its first ``k``
    passages by rank (``candidate_1..k``) and their teacher probabilities renormalized over those ``k``.

    Returns the wide table and the number of queries dropped for having fewer than ``k`` passages.
    """
    import polars as pl

    df = pl.from_arrow(table).sort(["qid", "rank"]).group_by("qid", maintain_order=True).head(k)
    counts = df.group_by("qid").len()
    short = counts.filter(pl.col("len") < k)["qid"]
    df = df.filter(~pl.col("qid").is_in(short.implode()))
    wide = df.group_by("qid", maintain_order=True).agg(
        pl.col("question").first().alias("query"), pl.col("passage"), pl.col("teacher_prob"))
    probs = wide["teacher_prob"].to_list()
    out = {"query": wide["query"].to_list()}
    for i in range(k):
        out[f"candidate_{i + 1}"] = [p[i] for p in wide["passage"].to_list()]
    out["teacher_probs"] = [[v / max(sum(row), 1e-12) for v in row] for row in probs]
    return pa.table(out), short.len()


def check_item(label: str, table: pa.Table, columns: list[str], objective_kind: str, global_batch: int) -> None:
    """Raise InputError naming the dataset and columns when ``table`` cannot train its objective."""
    S.require_columns(table.column_names, columns, f"dataset {label} (objective {objective_kind})")
    if table.num_rows == 0:
        raise InputError(f"dataset {label}: it is empty; check its source, split, filters or limit")
    if table.num_rows < global_batch:
        raise InputError(f"dataset {label}: {table.num_rows} rows is less than one global batch "
                         f"({global_batch} = train.batch_size x scaling.num_workers); lower the batch or add rows")
    for name in columns:
        nulls = table.column(name).null_count
        if nulls:
            raise InputError(f"dataset {label}: column {name!r} has {nulls} null values; "
                             "filter them out or quarantine them upstream")


def load_mixture(config: TrainConfig) -> list[LoadedDataset]:
    """Load and check every dataset before any worker starts.

    A ``multilingual_distill`` item's rows become its distinct (source, translation) pairs plus the
    teacher's embedding of each source: embedded on Ray Data (Ray must be up) unless stored already.
    """
    out = []
    labels = iter(config.item_labels())
    for phase in config.phase_list():
        global_batch = phase.train.batch_size * config.scaling.num_workers
        for item in phase.datasets:
            label = next(labels)
            table, manifest = load_item(item)
            if item.objective.kind == "multilingual_distill":
                table, manifest["distill"] = distill_rows(item, table, config)
            columns = list(required_columns(item.objective))
            check_item(label, table, columns, item.objective.kind, global_batch)
            out.append(LoadedDataset(label, table.select(columns).combine_chunks(), columns, manifest))
            log.info("dataset %s: %d rows, columns %s, objective %s", label, table.num_rows, columns,
                     item.objective.kind)
    return out


def distill_rows(item: MixtureItem, table: pa.Table, config: TrainConfig) -> tuple[pa.Table, dict[str, Any]]:
    """Parallel rows with the teacher's embeddings (Ray Data, or the stored ones) for a multilingual_distill item."""
    from workflows.train.teacher import default_store, distillation_table

    objective = item.objective
    data_uri = item.dataset if isinstance(item.dataset, str) else None
    store = objective.teacher_store or default_store(data_uri, config.output)
    sc = config.scaling
    return distillation_table(table, objective, item.label, objective.teacher or config.model.base, store,
                              config.model.max_seq_length, actors=sc.num_workers, cpus=sc.cpus_per_worker,
                              use_gpu=sc.use_gpu)


@dataclass(frozen=True)
class Schedule:
    """Which dataset and which rows a step trains on (identical on every rank)."""

    sizes: tuple[int, ...]
    weights: tuple[float, ...]
    mode: str
    batch_size: int
    world_size: int
    seed: int

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def batches_per_epoch(self, d: int) -> int:
        return self.sizes[d] // self.global_batch

    def total_steps(self, max_steps: int | None, epochs: float | None) -> int:
        if max_steps is not None:
            return max_steps
        return max(1, math.ceil(epochs * sum(self.batches_per_epoch(d) for d in range(len(self.sizes)))))

    def dataset_at(self, step: int) -> int:
        n = len(self.sizes)
        if n == 1:
            return 0
        if self.mode == "round_robin":
            return step % n
        p = np.asarray(self.weights, dtype=float)
        return int(np.random.default_rng([self.seed, step]).choice(n, p=p / p.sum()))

    def plan(self, first_step: int, last_step: int) -> list[tuple[int, int]]:
        """``(dataset, batch count of that dataset)`` for steps ``[first_step, last_step)``."""
        counts = [0] * len(self.sizes)
        out = []
        for step in range(last_step):
            d = self.dataset_at(step)
            if step >= first_step:
                out.append((d, counts[d]))
            counts[d] += 1
        return out

    def rows(self, d: int, count: int, rank: int) -> np.ndarray:
        """Row indices of dataset ``d`` for its ``count``-th global batch, on ``rank``."""
        per_epoch = self.batches_per_epoch(d)
        epoch, idx = divmod(count, per_epoch)
        perm = np.random.default_rng([self.seed, d, epoch]).permutation(self.sizes[d])
        start = idx * self.global_batch + rank * self.batch_size
        return perm[start:start + self.batch_size]


@dataclass(frozen=True)
class PhasedSchedule:
    """Phases one after the other, each a :class:`Schedule` over its own datasets.

    Dataset indices are global (positions in ``TrainConfig.items()``); phase ``p`` owns
    ``[offsets[p], offsets[p] + len(phase datasets))`` and steps ``[starts[p], starts[p] + steps[p])``.
    Phase ``p`` draws its rows with seed ``seed + p`` (phase 0 exactly as an unphased run).
    A run without ``phases`` is one phase.
    """

    phases: tuple[Schedule, ...]
    steps: tuple[int, ...]
    offsets: tuple[int, ...]

    @property
    def starts(self) -> tuple[int, ...]:
        return tuple(sum(self.steps[:p]) for p in range(len(self.steps)))

    @property
    def total(self) -> int:
        return sum(self.steps)

    @property
    def world_size(self) -> int:
        return self.phases[0].world_size

    @property
    def global_batch(self) -> int:
        """The global batch (of the only phase, or shared by all; see :meth:`global_batch_at`)."""
        batches = {s.global_batch for s in self.phases}
        if len(batches) > 1:
            raise ValueError(f"phases use different global batches {sorted(batches)}; use global_batch_at(step)")
        return batches.pop()

    def phase_at(self, step: int) -> int:
        """The phase that runs step ``step`` (0-based; the last phase for steps past the end)."""
        for p, start in enumerate(self.starts):
            if step < start + self.steps[p]:
                return p
        return len(self.steps) - 1

    def phase_end(self, done: int) -> bool:
        """Whether ``done`` finished steps end a phase."""
        return done in {start + n for start, n in zip(self.starts, self.steps)}

    def global_batch_at(self, step: int) -> int:
        return self.phases[self.phase_at(step)].global_batch

    def plan(self, first_step: int, last_step: int) -> list[tuple[int, int]]:
        """``(global dataset, batch count of that dataset)`` for steps ``[first_step, last_step)``."""
        out = []
        for p, (schedule, start, n) in enumerate(zip(self.phases, self.starts, self.steps)):
            lo, hi = max(first_step, start), min(last_step, start + n)
            if lo < hi:
                out += [(self.offsets[p] + d, c) for d, c in schedule.plan(lo - start, hi - start)]
        return out

    def rows(self, d: int, count: int, rank: int) -> np.ndarray:
        p = max(q for q, offset in enumerate(self.offsets) if offset <= d)
        return self.phases[p].rows(d - self.offsets[p], count, rank)


def schedule_for(config: TrainConfig, sizes: list[int]) -> PhasedSchedule:
    """The run's schedule; ``sizes``: rows per dataset of ``config.items()``, in order."""
    phases, steps, offsets, offset = [], [], [], 0
    for p, phase in enumerate(config.phase_list()):
        n = len(phase.datasets)
        schedule = Schedule(tuple(sizes[offset:offset + n]), tuple(i.weight for i in phase.datasets),
                            phase.train.mixture, phase.train.batch_size, config.scaling.num_workers, config.seed + p)
        phases.append(schedule)
        steps.append(schedule.total_steps(phase.train.max_steps, phase.train.epochs))
        offsets.append(offset)
        offset += n
    return PhasedSchedule(tuple(phases), tuple(steps), tuple(offsets))

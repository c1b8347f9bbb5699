"""The Ray Train loop: each worker trains a replica on its slice of every global batch.

Gradients are averaged across workers with one all-reduce of a flat buffer per step (backward
accumulates straight into it) instead of wrapping the model in ``DistributedDataParallel``
(``prepare_model(parallel_strategy=None)`` still places it on the worker's device).
Hand-written because DDP's reducer expects exactly one forward and one backward per step with
the same parameters used on every rank, which the objectives here break: GradCache (cached
MNRL) runs several backward passes per step, 2D Matryoshka samples layers per step, and
sentence-transformers embeds the anchor column in its own forward. One explicit all-reduce
after the step's backward passes is correct for all of them and moves the same bytes as DDP
(whose overlap of communication with backward buys little on CPU workers).

Per step: the schedule (``workflows.train.mixture``) names the dataset and rows; the text
columns are preprocessed with the model's own ``preprocess``; the dataset's
sentence-transformers loss runs; gradients are averaged, clipped, and AdamW steps with a linear
warmup/decay schedule. In a phased run each phase starts a fresh AdamW and schedule over its own
steps (and ends with a dev score and a checkpoint). Every ``every_n_steps`` and at the end, rank 0 scores the dev set
(broadcast to all ranks; also once before the first step), saves a checkpoint (a
``SentenceTransformer.save`` folder under ``model/`` plus ``state.pt``) and attaches it to
``ray.train.report``; every rank reports.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

MODEL_DIR = "model"
STATE_FILE = "state.pt"
HISTORY_FILE = "history.json"


def _world() -> tuple[int, int]:
    import ray.train

    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size()


def build_model(base: str, config) -> Any:
    """The SentenceTransformer to train, with the configured pooling and unused weights frozen.

    A decoder LLM (``config.decoder``) is wrapped by :func:`workflows.train.decoder.build_decoder_embedder`
    unless ``base`` is already a sentence-transformers folder (a checkpoint being resumed).
    """
    from embedforge.st_modules import load_sentence_transformer, module_types
    from workflows.train.pooling import set_pooling

    if getattr(config, "decoder", None) is not None and not module_types(base):
        from workflows.train.decoder import build_decoder_embedder

        return build_decoder_embedder(base, config)
    model = set_pooling(load_sentence_transformer(base, device="cpu"), config.pooling,
                        multilayer=getattr(config, "multilayer", None))
    if config.max_seq_length:
        model.max_seq_length = config.max_seq_length
    if config.freeze_unused:
        # sentence-transformers pools token embeddings; the HF pooler head is never used.
        pooler = getattr(model[0].auto_model, "pooler", None)
        if pooler is not None:
            for p in pooler.parameters():
                p.requires_grad_(False)
    return model


def make_batch(model, objective, table, rows, device, prompts: dict[str, str] | None = None) -> tuple[list[dict], Any]:
    """Features per input column (in the loss's order) and the label tensor (None when unlabeled).

    ``prompts``: text prepended to a column's inputs (the dataset's instruction prefixes).
    """
    from workflows.train.losses import input_columns, labels_from_batch

    batch = table.take(rows)
    features = []
    for name in input_columns(objective):
        texts = batch.column(name).to_pylist()
        if prompts and prompts.get(name):
            texts = [prompts[name] + t for t in texts]
        feats = model.preprocess(texts)
        features.append({k: (v.to(device) if hasattr(v, "to") else v) for k, v in feats.items()})
    labels = labels_from_batch(objective, {n: batch.column(n).to_pylist() for n in batch.column_names})
    return features, (labels.to(device) if labels is not None else None)


class FlatGradients:
    """Gradients of ``params`` as views into one flat buffer per dtype, averaged with one all-reduce each.

    Backward accumulates into the views in place (as DDP's ``gradient_as_bucket_view``), so the
    average needs no copy; a gradient some loss replaced instead is copied back into its view.

    ``row_sparse`` parameters (token-embedding tables: half of MiniLM's weights, of which a step
    touches a few hundred rows) stay out of the flat buffer: their average all-reduces a mask of
    the rows any rank touched, then only those rows. The result equals the dense average (a row
    no rank touched is zero everywhere) for a fraction of the bytes; DDP always sends the table
    dense unless the model uses sparse embeddings, which AdamW cannot take.
    """

    def __init__(self, params: list, row_sparse: list | None = None):
        import torch

        sparse_ids = {id(p) for p in row_sparse or []}
        self.row_sparse = [p for p in params if id(p) in sparse_ids]
        self.params = [p for p in params if id(p) not in sparse_ids]
        self.sparse_grads = [torch.zeros_like(p) for p in self.row_sparse]
        self.buffers: dict = {}
        self.views = []
        sizes: dict = {}
        for p in self.params:
            sizes[p.dtype] = sizes.get(p.dtype, 0) + p.numel()
        for dtype, n in sizes.items():
            self.buffers[dtype] = torch.zeros(n, dtype=dtype, device=params[0].device)
        offsets = dict.fromkeys(sizes, 0)
        for p in self.params:
            o = offsets[p.dtype]
            self.views.append(self.buffers[p.dtype][o:o + p.numel()].view_as(p))
            offsets[p.dtype] = o + p.numel()
        self.attach()

    def attach(self) -> None:
        for p, view in zip(self.params + self.row_sparse, self.views + self.sparse_grads):
            p.grad = view

    def zero(self) -> None:
        for buf in self.buffers.values():
            buf.zero_()
        for g in self.sparse_grads:
            g.zero_()
        self.attach()

    def average(self, world_size: int) -> None:
        """All-reduce the mean gradient (a parameter without a gradient counts as zero)."""
        import torch.distributed as dist

        for p, view in zip(self.params + self.row_sparse, self.views + self.sparse_grads):
            if p.grad is None:
                p.grad = view  # the buffer already holds zeros for it
            elif p.grad.data_ptr() != view.data_ptr():
                view.copy_(p.grad)
                p.grad = view
        if world_size == 1:
            return
        for buf in self.buffers.values():
            dist.all_reduce(buf)
            buf.div_(world_size)
        for g in self.sparse_grads:
            touched = g.ne(0).any(dim=1).to(g.dtype)
            dist.all_reduce(touched)
            rows = touched.nonzero().squeeze(1)
            values = g.index_select(0, rows)
            dist.all_reduce(values)
            g.index_copy_(0, rows, values.div_(world_size))


def row_sparse_parameters(model, min_rows: int = 1024) -> list:
    """Trainable token-embedding tables (``nn.Embedding`` of at least ``min_rows`` rows)."""
    import torch

    return [m.weight for m in model.modules()
            if isinstance(m, torch.nn.Embedding) and m.num_embeddings >= min_rows and m.weight.requires_grad]


def broadcast_parameters(model, world_size: int) -> None:
    """Start every rank from rank 0's weights (what DDP does at construction)."""
    import torch.distributed as dist

    if world_size == 1:
        return
    for tensor in list(model.parameters()) + list(model.buffers()):
        dist.broadcast(tensor.data, src=0)


def start_step_seed(state: dict[str, Any]) -> int:
    """A seed offset so a resumed run does not replay the dropout masks of its first steps."""
    return int(state["step"]) * 7919


def dev_metric(model, dev: dict | None, batch_size: int, prompt: str | None = None) -> float | None:
    """Spearman of cosine similarity on the dev pairs (sentence-transformers' own evaluator).

    ``prompt``: prepended to both sentences (None: the model's default prompt, as ``encode`` does).
    """
    if dev is None:
        return None
    from sentence_transformers.sentence_transformer.evaluation import EmbeddingSimilarityEvaluator

    s1, s2 = dev["sentence1"], dev["sentence2"]
    if prompt:
        s1, s2 = [prompt + t for t in s1], [prompt + t for t in s2]
    evaluator = EmbeddingSimilarityEvaluator(s1, s2, dev["score"],
                                             batch_size=batch_size, main_similarity="cosine",
                                             name="dev", write_csv=False)
    model.eval()
    try:
        results = evaluator(model)
    finally:
        model.train()
    return float(results[evaluator.primary_metric])


def broadcast_float(value: float | None, world_size: int, device=None) -> float | None:
    import torch
    import torch.distributed as dist

    if world_size == 1:
        return value
    # NCCL broadcasts only device tensors; gloo takes either
    t = torch.tensor([float("nan") if value is None else value], dtype=torch.float64, device=device)
    dist.broadcast(t, src=0)
    return None if t.isnan().item() else float(t.item())


def save_checkpoint(path: Path, model, optimizer, scheduler, step: int, history: list[dict],
                    phase: int = 0) -> None:
    import torch

    from workflows.train.decoder import is_lora, save_embedder, trainable_state

    save_embedder(model, str(path / MODEL_DIR))  # LoRA: merged, a plain folder
    extra = {"trainable": trainable_state(model)} if is_lora(model) else {}
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step,
                "history": history, "phase": phase, **extra}, path / STATE_FILE)
    (path / HISTORY_FILE).write_text(json.dumps(history))


def build_optimizer(params: list, optim, steps: int) -> tuple[Any, Any]:
    """AdamW and its linear warmup/decay over ``steps`` (one phase) from an ``OptimConfig``.

    Fused AdamW: one kernel over all parameters (CPU and CUDA), as the transformers Trainer's default.
    """
    import torch
    from transformers import get_linear_schedule_with_warmup

    optimizer = torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay, fused=True)
    return optimizer, get_linear_schedule_with_warmup(optimizer, int(optim.warmup_ratio * steps), steps)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Entry of every Ray Train worker. ``loop_config``: see ``workflows.train.run.build_trainer``."""
    import ray
    import ray.train
    import torch
    from ray.train import Checkpoint
    from ray.train.torch import get_device, prepare_model

    from workflows.train.config import TrainConfig
    from workflows.train.losses import build_loss
    from workflows.train.losses.steps import begin_step
    from workflows.train.mixture import PhasedSchedule

    config = TrainConfig.model_validate(loop_config["config"])
    rank, world = _world()
    torch.set_num_threads(max(1, int(config.scaling.cpus_per_worker)))
    torch.manual_seed(config.seed)
    tables = [ray.get(ref, timeout=600) for ref in loop_config["tables"]]
    dev = ray.get(loop_config["dev"], timeout=600) if loop_config.get("dev") is not None else None
    schedule: PhasedSchedule = loop_config["schedule"]
    total_steps: int = loop_config["total_steps"]
    step_callback: Callable[[int, int], None] | None = loop_config.get("step_callback")

    checkpoint = ray.train.get_checkpoint()
    state: dict[str, Any] = {"step": 0, "history": []}
    tmp_restore = None
    base = loop_config["base_model"]
    if checkpoint is not None:
        tmp_restore = tempfile.mkdtemp(prefix="ef-restore-")
        restored = Path(checkpoint.to_directory(tmp_restore))
        base = str(restored / MODEL_DIR)
        state = torch.load(restored / STATE_FILE, weights_only=False)
    device = get_device()
    if checkpoint is not None and "trainable" in state:
        # LoRA: the checkpoint's folder is merged; resume the adapters on the original base instead
        from workflows.train.decoder import load_trainable_state

        model = build_model(loop_config["base_model"], config.model)
        load_trainable_state(model, state["trainable"])
    else:
        model = build_model(base, config.model.model_copy(update={"pooling": "keep"}) if checkpoint else config.model)
    model = prepare_model(model, parallel_strategy=None)
    broadcast_parameters(model, world)
    # dropout differs per rank; Python's `random` is seeded alike on every rank so any library code
    # drawing from it in lockstep agrees (the 2DMSE grid draws from its own (seed, step) generator)
    torch.manual_seed(config.seed * 1000 + rank + start_step_seed(state))
    random.seed(config.seed * 1000 + start_step_seed(state))
    model.train()
    items, phases = config.items(), config.phase_list()
    losses = [build_loss(item.objective, model) for item in items]
    params = [p for p in model.parameters() if p.requires_grad]
    for loss in losses:
        params += [p for p in loss.parameters() if p.requires_grad and all(p is not q for q in params)]
    phase = schedule.phase_at(int(state["step"]))
    optim = phases[phase].train
    optimizer, scheduler = build_optimizer(params, optim, schedule.steps[phase])
    grads = FlatGradients(params, row_sparse=row_sparse_parameters(model))
    # a checkpoint from the end of the previous phase resumes into a fresh optimizer, as the phase change would
    if checkpoint is not None and state.get("phase", 0) == phase:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    if checkpoint is not None:
        shutil.rmtree(tmp_restore, ignore_errors=True)
        if rank == 0:
            log.info("resumed from step %d", state["step"])
    history: list[dict] = list(state["history"])
    start = int(state["step"])
    labels = config.item_labels()
    every = config.checkpoint.every_n_steps

    def dev_score() -> float | None:
        """Rank 0 scores the dev set; every rank gets the score."""
        score = dev_metric(model, dev, config.dev.batch_size, config.dev.prompt) if rank == 0 else None
        return broadcast_float(score, world, device)

    if start == 0 and dev is not None:
        # the starting point of the dev curve: what training has to beat
        score = dev_score()
        history.append({"step": 0, "dev_spearman": score})
        if rank == 0:
            log.info("step 0/%d dev_spearman %.4f (before training)", total_steps, score)
    window_loss, window_n, window_sync, window_t = 0.0, 0, 0.0, time.perf_counter()

    for step, (d, count) in zip(range(start, total_steps), schedule.plan(start, total_steps)):
        if schedule.phase_at(step) != phase:  # the next phase: its own optimizer, warmup and decay
            phase = schedule.phase_at(step)
            optim = phases[phase].train
            optimizer, scheduler = build_optimizer(params, optim, schedule.steps[phase])
            if rank == 0:
                log.info("phase %s: steps %d-%d", phases[phase].name, step + 1, step + schedule.steps[phase])
        features, label = make_batch(model, items[d].objective, tables[d], schedule.rows(d, count, rank), device,
                                     items[d].prompts)
        begin_step(losses[d], step=step, total_steps=total_steps, seed=config.seed)
        loss_value = losses[d](features, label)
        loss_value.backward()
        t_sync = time.perf_counter()
        grads.average(world)
        window_sync += time.perf_counter() - t_sync
        if optim.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, optim.max_grad_norm)
        optimizer.step()
        scheduler.step()
        grads.zero()
        window_loss += float(loss_value.detach())
        window_n += 1
        done = step + 1
        if step_callback is not None:
            step_callback(done, rank)
        at_ckpt = done % every == 0 or done == total_steps or schedule.phase_end(done)
        if not at_ckpt and done % optim.log_every_n_steps:
            continue
        elapsed = time.perf_counter() - window_t
        metrics = {"step": done, "train_loss": window_loss / window_n, "lr": scheduler.get_last_lr()[0],
                   "dataset": labels[d], "samples_per_s": window_n * schedule.global_batch_at(step) / max(elapsed, 1e-9),
                   "sync_share": window_sync / max(elapsed, 1e-9)}
        window_loss, window_n, window_sync = 0.0, 0, 0.0
        if not at_ckpt:
            history.append(metrics)
            if rank == 0:
                log.info("step %d/%d loss %.4f lr %.2e %.1f samples/s (gradient all-reduce %.0f%%)", done,
                         total_steps, metrics["train_loss"], metrics["lr"], metrics["samples_per_s"],
                         100 * metrics["sync_share"])
            ray.train.report(metrics)
            window_t = time.perf_counter()
            continue
        score = dev_score()
        if score is not None:
            metrics["dev_spearman"] = score
        history.append(metrics)
        if rank == 0:
            log.info("step %d/%d loss %.4f dev_spearman %s: checkpoint", done, total_steps, metrics["train_loss"],
                     "n/a" if score is None else f"{score:.4f}")
            with tempfile.TemporaryDirectory(prefix="ef-ckpt-") as tmp:
                save_checkpoint(Path(tmp), model, optimizer, scheduler, done, history, phase=phase)
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics)
        window_t = time.perf_counter()

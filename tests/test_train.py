"""Training on Ray Train: config checks, the data schedule, and real 2-worker CPU runs on a tiny BERT."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from embedforge.config import build_config, load_config
from embedforge.errors import ConfigError, EngineError, InputError
from tests.train_fixtures import tiny_model_path  # noqa: F401  (fixture)
from workflows.train.config import TrainConfig
from workflows.train.mixture import Schedule, check_item

REPO = Path(__file__).resolve().parents[1]


def _config(tmp: Path | str, base: str, datasets: list[dict], **over) -> TrainConfig:
    data = {"model": {"base": base}, "datasets": datasets,
            "train": {"max_steps": 4, "batch_size": 4, "log_every_n_steps": 1},
            "dev": {"dataset": {"source": "stsb", "split": "dev", "limit": 16}, "batch_size": 16},
            "checkpoint": {"every_n_steps": 2, "keep_best_k": 2}, "failure": {"max_failures": 1},
            "output": str(tmp), "run_name": "t"}
    for key, value in over.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return build_config(TrainConfig, data)


STSB = {"dataset": {"source": "stsb", "split": "train", "limit": 32}, "objective": {"kind": "cosent"}}


# ---------------------------------------------------------------- config and data checks (no Ray)


@pytest.mark.parametrize("path", sorted(REPO.glob("configs/train*.yaml")), ids=lambda p: p.name)
def test_example_configs_validate(path):
    config = load_config(TrainConfig, path)
    assert config.items() and config.output


def test_test_split_is_refused_for_training_and_dev():
    bad = {"dataset": {"source": "stsb", "split": "test"}, "objective": {"kind": "cosent"}}
    with pytest.raises(ConfigError, match="test splits are for final evaluation"):
        _config("/tmp/x", "m", [bad])
    with pytest.raises(ConfigError, match="dev.dataset"):
        _config("/tmp/x", "m", [STSB], dev={"dataset": {"source": "stsb", "split": "test"}})


def test_steps_or_epochs_exactly_one():
    with pytest.raises(ConfigError, match="exactly one of train.max_steps and train.epochs"):
        _config("/tmp/x", "m", [STSB], train={"max_steps": 3, "epochs": 1.0})


def test_incompatible_loss_and_data_names_dataset_and_columns():
    triplets = pa.table({"anchor": ["a"] * 8, "positive": ["b"] * 8, "negative": ["c"] * 8})
    with pytest.raises(InputError, match=r"dataset nli \(objective cosent\): missing columns \['sentence1', "
                                         r"'sentence2', 'score'\]; received columns \['anchor'"):
        check_item("nli", triplets, ["sentence1", "sentence2", "score"], "cosent", 4)
    with pytest.raises(InputError, match="dataset empty: it is empty"):
        check_item("empty", triplets.slice(0, 0), ["anchor"], "mnrl", 4)
    with pytest.raises(InputError, match="less than one global batch"):
        check_item("small", triplets, ["anchor"], "mnrl", 16)
    nulls = pa.table({"anchor": ["a", None, "b", "c"]})
    with pytest.raises(InputError, match="column 'anchor' has 1 null"):
        check_item("n", nulls, ["anchor"], "mnrl", 2)


def test_reward_feedback_rows_pivot_to_kl_distill_rows():
    from workflows.train.mixture import pivot_feedback

    long = pa.table({"qid": ["q1", "q1", "q1", "q2", "q2", "q3"], "question": ["a?", "a?", "a?", "b?", "b?", "c?"],
                     "passage": ["p2", "p0", "p1", "r1", "r0", "s0"], "rank": [2, 0, 1, 1, 0, 0],
                     "teacher_prob": [0.2, 0.5, 0.3, 0.4, 0.6, 1.0]})
    wide, dropped = pivot_feedback(long, 2)
    assert dropped == 1  # q3 has one passage
    assert wide.column("query").to_pylist() == ["a?", "b?"]
    assert wide.column("candidate_1").to_pylist() == ["p0", "r0"]
    assert wide.column("candidate_2").to_pylist() == ["p1", "r1"]
    np.testing.assert_allclose(wide.column("teacher_probs").to_pylist()[0], [0.625, 0.375])


def _synthesized_rows() -> pa.Table:
    """Rows as a synthesize `data` output holds them: scored pairs and NLI triplets in one table."""
    return pa.table({
        "kind": ["scored_pairs", "scored_pairs", "nli_triplets"],
        "sentence1": ["Ein Hund rennt.", "Eine Frau kocht.", None],
        "sentence2": ["Ein Hund läuft.", "Ein Hund rennt.", None],
        "source_sentence1": ["A dog runs.", "A woman cooks.", None],
        "source_sentence2": ["A dog walks.", "A dog runs.", None],
        "anchor": [None, None, "Ein Mann isst."], "source_anchor": [None, None, "A man eats."],
        "positive": [None, None, "Jemand isst."], "source_positive": [None, None, "Someone eats."],
        "score": [0.8, 0.1, None]})


def test_parallel_pairs_melt_the_synthesized_columns_into_distinct_pairs():
    from workflows.train.teacher import parallel_pairs

    table, info = parallel_pairs(_synthesized_rows(), None, "syn")
    pairs = list(zip(table.column("source_sentence").to_pylist(), table.column("translation").to_pylist()))
    # "A dog runs." -> "Ein Hund rennt." is sentence1 of row 0 and sentence2 of row 1: kept once
    assert pairs == [("A dog runs.", "Ein Hund rennt."), ("A woman cooks.", "Eine Frau kocht."),
                     ("A dog walks.", "Ein Hund läuft."), ("A man eats.", "Ein Mann isst."),
                     ("Someone eats.", "Jemand isst.")]
    assert info["duplicates_merged"] == 1 and ["source_anchor", "anchor"] in info["pairs"]
    only, _ = parallel_pairs(_synthesized_rows(), [["source_anchor", "anchor"]], "syn")
    assert only.num_rows == 1
    with pytest.raises(InputError, match=r"objective.pairs names missing columns \['nope'\]"):
        parallel_pairs(_synthesized_rows(), [["nope", "anchor"]], "syn")
    with pytest.raises(InputError, match="no parallel columns found.*set objective.pairs"):
        parallel_pairs(pa.table({"sentence1": ["a"], "sentence2": ["b"]}), None, "plain")
    half = _synthesized_rows().set_column(1, "sentence1", pa.array([None, "Eine Frau kocht.", None], pa.string()))
    with pytest.raises(InputError, match="column 'sentence1' is null in 1 rows where 'source_sentence1' is not"):
        parallel_pairs(half, None, "syn")
    # the synthesize stage's `parallel` sub-output (one sentence a row) is found without `pairs`
    par = pa.table({"row_id": [0, 0, 1], "column": ["sentence1", "sentence2", "sentence2"],
                    "source_sentence": ["A dog runs.", "A dog walks.", "A dog runs."],
                    "sentence": ["Ein Hund rennt.", "Ein Hund läuft.", "Ein Hund rennt."],
                    "target_lang": ["de"] * 3, "cosine": [0.9] * 3, "margin": [1.1] * 3})
    table, info = parallel_pairs(par, None, "par")
    assert info["pairs"] == [["source_sentence", "sentence"]] and table.num_rows == 2


class FakeTeacherEmbed:
    """Stands in for the Ray Data job: a deterministic embedding per text, and a call count."""

    def __init__(self, dims: int = 4):
        self.calls, self.dims = 0, dims

    def __call__(self, texts, teacher_path, max_seq_length, batch_size, actors, cpus, use_gpu):
        self.calls += 1
        return np.asarray([[len(t) + j for j in range(self.dims)] for t in texts], dtype=np.float32)


def test_teacher_embeddings_are_committed_once_and_reused_per_teacher_and_data(tmp_path, tiny_model_path):  # noqa: F811
    from embedforge import storage
    from workflows.train.losses import MultilingualDistillConfig
    from workflows.train.teacher import distillation_table

    objective = MultilingualDistillConfig()
    fake, store = FakeTeacherEmbed(), str(tmp_path / "store")
    args = dict(teacher=tiny_model_path, store=store, max_seq_length=None, actors=2, cpus=1, use_gpu=False)
    table, info = distillation_table(_synthesized_rows(), objective, "syn", embed=fake, **args)
    assert table.column_names == ["source_sentence", "translation", "teacher_embedding"]
    emb = np.asarray(table.column("teacher_embedding").to_pylist())
    np.testing.assert_array_equal(emb[:, 0], [len(s) for s in table.column("source_sentence").to_pylist()])
    assert fake.calls == 1 and info["teacher"]["reused"] is False and info["teacher"]["rows"] == 5
    assert storage.is_committed(info["teacher"]["uri"]) and info["teacher"]["uri"].startswith(store)
    again, info2 = distillation_table(_synthesized_rows(), objective, "syn", embed=fake, **args)
    assert fake.calls == 1 and info2["teacher"]["reused"] is True and again.equals(table)
    # other data (one row fewer) is another key: embedded again, the first entry stays
    _, info3 = distillation_table(_synthesized_rows().slice(0, 2), objective, "syn", embed=fake, **args)
    assert fake.calls == 2 and info3["teacher"]["uri"] != info["teacher"]["uri"]
    assert storage.is_committed(info["teacher"]["uri"])


def test_schedule_splits_each_global_batch_across_ranks_and_covers_an_epoch():
    s = Schedule(sizes=(40, 12), weights=(1.0, 1.0), mode="round_robin", batch_size=2, world_size=2, seed=3)
    plan = s.plan(0, 8)
    assert [d for d, _ in plan] == [0, 1] * 4
    seen = []
    for d, count in plan:
        if d == 0:
            r0, r1 = s.rows(0, count, 0), s.rows(0, count, 1)
            assert not set(r0) & set(r1)
            seen += list(r0) + list(r1)
    assert len(seen) == len(set(seen)) == 16
    # dataset 1 has 12 // 4 = 3 batches per epoch: its 4th batch starts a fresh permutation
    assert s.batches_per_epoch(1) == 3 and plan[7] == (1, 3)
    assert s.total_steps(None, 1.0) == 10 + 3
    # resuming at step 5 plans exactly what the uninterrupted run planned
    assert s.plan(5, 8) == plan[5:]


def test_proportional_schedule_follows_weights_and_is_deterministic():
    s = Schedule(sizes=(100, 100), weights=(3.0, 1.0), mode="proportional", batch_size=1, world_size=1, seed=0)
    picks = [s.dataset_at(i) for i in range(2000)]
    assert picks == [s.dataset_at(i) for i in range(2000)]
    assert 0.70 < picks.count(0) / 2000 < 0.80


NLI = {"dataset": {"source": "sick", "split": "train", "kind": "nli_triplets", "limit": 32},
       "objective": {"kind": "mnrl"}}


def _phased(tmp, base: str, **over) -> TrainConfig:
    each = {"log_every_n_steps": 1}
    phases = [{"name": "nli", "datasets": [NLI], "train": {"max_steps": 2, "batch_size": 4, "lr": 1e-4, **each}},
              {"name": "sts", "datasets": [STSB], "train": {"max_steps": 3, "batch_size": 2, "lr": 2e-5, **each}}]
    data = {"model": {"base": base}, "phases": phases,
            "dev": {"dataset": {"source": "stsb", "split": "dev", "limit": 16}, "batch_size": 16},
            "checkpoint": {"every_n_steps": 100, "keep_best_k": 3}, "failure": {"max_failures": 1},
            "output": str(tmp), "run_name": "p", **over}
    return build_config(TrainConfig, data)


def test_phases_config_is_one_form_or_the_other():
    config = _phased("/tmp/x", "m")
    assert [p.name for p in config.phase_list()] == ["nli", "sts"]
    assert config.item_labels() == ["nli/sick:train", "sts/stsb:train"]
    plain = _config("/tmp/x", "m", [STSB])
    assert [p.name for p in plain.phase_list()] == ["train"] and plain.item_labels() == ["stsb:train"]
    with pytest.raises(ConfigError, match="remove the top-level `datasets` and `train`"):
        _phased("/tmp/x", "m", datasets=[STSB])
    with pytest.raises(ConfigError, match="datasets and train: required"):
        build_config(TrainConfig, {"output": "/tmp/x"})
    with pytest.raises(ConfigError, match=r"phases: names \['a', 'a'\] repeat"):
        _phased("/tmp/x", "m", phases=[{"name": "a", "datasets": [STSB], "train": {"max_steps": 1}}] * 2)
    bad = {**STSB, "dataset": {"source": "stsb", "split": "test"}}
    with pytest.raises(ConfigError, match=r"phases\[1\].datasets\[0\].*test splits"):
        _phased("/tmp/x", "m", phases=[{"name": "a", "datasets": [STSB], "train": {"max_steps": 1}},
                                       {"name": "b", "datasets": [bad], "train": {"max_steps": 1}}])
    with pytest.raises(ConfigError, match="phases.0.train.max_steps"):
        _phased("/tmp/x", "m", phases=[{"name": "a", "datasets": [STSB], "train": {"max_steps": 0}}])


def test_phased_schedule_runs_phases_in_order_with_their_own_batches():
    from workflows.train.mixture import schedule_for

    config = _phased("/tmp/x", "m", phases=[
        {"name": "a", "datasets": [NLI, {**STSB, "name": "s"}], "train": {"epochs": 1, "batch_size": 4,
                                                                         "mixture": "round_robin"}},
        {"name": "b", "datasets": [STSB], "train": {"max_steps": 3, "batch_size": 2}}])
    s = schedule_for(config, [40, 24, 30])  # world 2: phase a has a global batch of 8: 5 + 3 batches an epoch
    assert s.steps == (8, 3) and s.starts == (0, 8) and s.total == 11
    plan = s.plan(0, 11)
    assert [d for d, _ in plan] == [0, 1] * 4 + [2, 2, 2]
    assert [s.phase_at(i) for i in (0, 7, 8, 10)] == [0, 0, 1, 1]
    assert s.phase_end(8) and s.phase_end(11) and not s.phase_end(9)
    assert s.global_batch_at(0) == 8 and s.global_batch_at(8) == 4
    assert len(s.rows(2, 0, 1)) == 2 and len(s.rows(0, 0, 1)) == 4
    assert s.plan(7, 11) == plan[7:]  # resuming mid-run plans exactly the rest
    with pytest.raises(ValueError, match="different global batches"):
        _ = s.global_batch
    # one phase is the unphased schedule of before
    one = schedule_for(_config("/tmp/x", "m", [STSB]), [32])
    assert one.plan(0, 4) == one.phases[0].plan(0, 4) and one.global_batch == 8


def test_flat_gradients_hold_the_autograd_gradients_in_one_buffer():
    import torch

    from workflows.train.loop import FlatGradients

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    unused = torch.nn.Parameter(torch.ones(5))
    x = torch.randn(6, 4)
    net(x).pow(2).sum().backward()
    expected = [p.grad.clone() for p in net.parameters()]
    params = list(net.parameters()) + [unused]
    grads = FlatGradients(params)
    for _ in range(2):  # the second step checks zero() resets the views that backward accumulates into
        grads.zero()
        net(x).pow(2).sum().backward()
        net[0].bias.grad = net[0].bias.grad.clone()  # a replaced gradient is copied back
        grads.average(world_size=1)
        for p, e in zip(net.parameters(), expected):
            torch.testing.assert_close(p.grad, e)
        buf = grads.buffers[torch.float32]
        assert buf.numel() == sum(p.numel() for p in params)
        assert all(p.grad.data_ptr() >= buf.data_ptr() for p in params)
        assert torch.equal(unused.grad, torch.zeros(5))


def _row_sparse_worker(rank, world, port):
    import torch
    import torch.distributed as dist

    from workflows.train.loop import FlatGradients, row_sparse_parameters

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Embedding(2000, 8), torch.nn.Linear(8, 3))
        ids = [torch.tensor([[1, 5, 7], [5, 9, 1999]]), torch.tensor([[2, 5, 300], [7, 7, 0]])]

        def loss(r):
            return net(ids[r]).pow(2).sum()

        params = list(net.parameters())
        assert row_sparse_parameters(net) == [net[0].weight]
        for p in params:
            p.grad = None
        for r in range(world):  # the dense average, computed locally from every rank's batch
            loss(r).backward()
        expected = [p.grad / world for p in params]
        grads = FlatGradients(params, row_sparse=row_sparse_parameters(net))
        for _ in range(2):  # twice: zero() must reset the sparse table's gradient too
            grads.zero()
            loss(rank).backward()
            grads.average(world)
            for p, e in zip(params, expected):
                torch.testing.assert_close(p.grad, e)
        assert all(p is not net[0].weight for p in grads.params)
    finally:
        dist.destroy_process_group()


def test_row_sparse_embedding_average_equals_the_dense_average():
    """Token-embedding rows averaged over the rows any rank touched == the dense mean (2 gloo processes)."""
    import torch.multiprocessing as mp

    from tests.s3server import _free_ports

    mp.spawn(_row_sparse_worker, args=(2, _free_ports(1)[0]), nprocs=2, join=True)


def test_job_dry_run_and_bad_config_exit_codes(capsys):
    from jobs.train import main

    assert main(["--config", str(REPO / "configs/train.yaml"), "--dry-run"]) == 0
    assert "run_name: minilm-mixture" in capsys.readouterr().out
    assert main(["--config", str(REPO / "configs/train.yaml"), "--set", "train.batch_size=0"]) == 2
    assert "train.batch_size" in capsys.readouterr().err


def test_missing_columns_fail_before_workers_start(tmp_path, tiny_model_path):  # noqa: F811
    from workflows.train.mixture import load_mixture

    sick = {"dataset": {"source": "sick", "split": "train", "kind": "nli_triplets", "limit": 32},
            "objective": {"kind": "cosent"}, "name": "sick-triplets"}
    with pytest.raises(InputError, match=r"dataset sick-triplets \(objective cosent\): missing columns"):
        load_mixture(_config(tmp_path, tiny_model_path, [sick]))


# ---------------------------------------------------------------- real Ray Train runs


def _step_logger(log_dir: Path, fail_rank: int | None = None, fail_step: int | None = None):
    """A step callback that logs each finished step per rank and fails once at ``fail_step``."""
    log_dir = str(log_dir)

    def callback(step: int, rank: int) -> None:
        from pathlib import Path as P

        with open(P(log_dir) / f"rank{rank}.log", "a") as f:
            f.write(f"{step}\n")
        marker = P(log_dir) / "failed-once"
        if rank == fail_rank and step == fail_step and not marker.exists():
            marker.write_text("x")
            raise RuntimeError(f"injected failure on rank {rank} at step {step}")

    return callback


def _steps(log_dir: Path, rank: int = 0) -> list[int]:
    return [int(x) for x in (log_dir / f"rank{rank}.log").read_text().split()]


def _check_export(model_uri: str) -> None:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(model_uri, device="cpu")
    emb = model.encode(["a man plays a guitar", "a woman is cooking"])
    assert emb.shape[0] == 2 and np.isfinite(emb).all()
    card = (Path(model_uri) / "README.md").read_text()
    assert "stsb:train" in card and "## Dev metrics" in card and "base_model" in card
    assert "(before training: " in card


@pytest.mark.timeout(600)
def test_two_worker_run_survives_a_worker_failure_and_exports(ray_local, tmp_path, tiny_model_path):  # noqa: F811
    """2 gloo workers, CoSENT; rank 1 dies once after step 3 and both resume from the step-2 checkpoint."""
    from workflows.train.run import run_train

    logs = tmp_path / "logs"
    logs.mkdir()
    config = _config(tmp_path / "run", tiny_model_path, [STSB])
    summary = run_train(config, step_callback=_step_logger(logs, fail_rank=1, fail_step=3))
    assert (logs / "failed-once").exists()
    assert _steps(logs, 0) == [1, 2, 3, 3, 4]  # steps 1-3, then resumed from the checkpoint of step 2
    assert _steps(logs, 1) == [1, 2, 3, 3, 4]
    manifest = json.loads((tmp_path / "run" / "_MANIFEST.json").read_text())
    assert manifest["steps"] == 4 and "dev_spearman" in manifest["dev_metrics"]
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [h["step"] for h in history] == [0, 1, 2, 3, 4]  # step 0: dev before training
    assert set(history[0]) == {"step", "dev_spearman"} and manifest["base_dev_metrics"] == {
        "dev_spearman": history[0]["dev_spearman"]}
    assert (tmp_path / "run" / "training_curve.png").stat().st_size > 1000
    assert summary["model"] == str(tmp_path / "run" / "model")
    _check_export(summary["model"])


def _kl_output(tmp_path: Path) -> str:
    """A committed reward-style output: queries with 3 candidates and teacher probabilities."""
    from embedforge.data import DatasetSpec, load_dataset
    from embedforge.storage import ShardedWriter

    df = load_dataset(DatasetSpec(source="stsb", split="train", limit=24))
    s1, s2 = df["sentence1"].to_list(), df["sentence2"].to_list()
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), size=len(s1)).astype("float32").tolist()
    table = pa.table({"query": s1, "candidate_1": s2, "candidate_2": s2[1:] + s2[:1],
                      "candidate_3": s2[2:] + s2[:2], "teacher_probs": probs})
    prefix = str(tmp_path / "reward-out")
    writer = ShardedWriter(prefix)
    writer.write("part-0", {"data": table})
    writer.finish({"kind": "reward"})
    return prefix


OBJECTIVES = {
    "mnrl_gathered": ({"source": "sick", "split": "train", "kind": "nli_triplets", "limit": 32},
                      {"kind": "mnrl", "gather_across_workers": True}),
    "cached_mnrl": ({"source": "sick", "split": "train", "kind": "nli_triplets", "limit": 32},
                    {"kind": "cached_mnrl", "gather_across_workers": True, "mini_batch_size": 2}),
    "angle": ({"source": "stsb", "split": "train", "limit": 32}, {"kind": "angle"}),
    "score_distill": ({"source": "stsb", "split": "train", "limit": 32},
                      {"kind": "score_distill", "teacher_column": "score"}),
    "kl_distill": (None, {"kind": "kl_distill", "num_candidates": 3}),
    "cosent_2dmse": ({"source": "stsb", "split": "train", "limit": 32},
                     {"kind": "cosent", "matryoshka2d": {"layers": [1], "dims": [32, 16]}}),
}


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_each_objective_trains_on_two_workers(ray_local, tmp_path, tiny_model_path, name):  # noqa: F811
    from sentence_transformers import SentenceTransformer

    from embedforge.elastic import read_grid
    from workflows.train.run import run_train

    dataset, objective = OBJECTIVES[name]
    item = {"dataset": dataset if dataset is not None else _kl_output(tmp_path), "objective": objective}
    config = _config(tmp_path / "run", tiny_model_path, [item], train={"max_steps": 2},
                     checkpoint={"every_n_steps": 2})
    summary = run_train(config)
    assert np.isfinite(summary["final_train_loss"])
    model = SentenceTransformer(summary["model"], device="cpu")
    assert model.encode(["x"]).shape == (1, 32)
    if name == "cosent_2dmse":
        assert read_grid(summary["model"]) == {"layers": [1, 2], "dims": [16, 32]}


@pytest.mark.timeout(600)
def test_multilingual_distillation_mixed_with_cosent_on_two_workers(ray_local, tmp_path, tiny_model_path):  # noqa: F811
    """Parallel rows of a synthesize-layout output: the teacher embeds on Ray Data, beside the data, once."""
    from benchmarks.parallel_reference import write_reference
    from embedforge import storage
    from workflows.train.run import run_train

    data = str(tmp_path / "parallel")
    write_reference(data, "de", "train", limit=12)
    distill = {"name": "de-parallel", "dataset": data, "objective": {"kind": "multilingual_distill",
                                                                   "teacher_batch_size": 8}}
    config = _config(tmp_path / "run", tiny_model_path, [distill, STSB], train={"mixture": "round_robin"})
    summary = run_train(config)
    assert np.isfinite(summary["final_train_loss"])
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [h.get("dataset") for h in history[1:]] == ["de-parallel", "stsb:train"] * 2
    entry = summary["manifest"]["datasets"][0]
    assert entry["rows"] == 24 - entry["manifest"]["distill"]["duplicates_merged"]
    teacher = entry["manifest"]["distill"]["teacher"]
    assert teacher["reused"] is False and teacher["dims"] == 32 and teacher["uri"].startswith(
        f"{data}/teacher_embeddings/")
    stored = storage.read_manifest(teacher["uri"])
    assert stored["kind"] == "teacher_embeddings" and stored["rows"] == teacher["rows"] <= 24
    # the stored targets are the base model's own embeddings of the English sources
    from sentence_transformers import SentenceTransformer

    table = storage.read_committed_table(teacher["uri"])
    base = SentenceTransformer(tiny_model_path, device="cpu")
    expected = base.encode(table.column("source_sentence").to_pylist()[:4])
    np.testing.assert_allclose(np.asarray(table.column("teacher_embedding").to_pylist()[:4]), expected, atol=1e-5)
    card = (Path(summary["model"]) / "README.md").read_text()
    assert "de-parallel" in card and "multilingual_distill" in card


@pytest.mark.timeout(600)
def test_phases_run_in_order_restart_the_optimizer_and_resume_across_the_boundary(ray_local, tmp_path,
                                                                                 tiny_model_path):  # noqa: F811
    """NLI (MNRL) for 2 steps, then STS (CoSENT) for 3 on 2 workers; rank 1 dies once at step 3, just after
    the checkpoint that ends phase 1, and the run resumes into phase 2 with a fresh optimizer."""
    from workflows.train.run import run_train

    logs = tmp_path / "logs"
    logs.mkdir()
    summary = run_train(_phased(tmp_path / "run", tiny_model_path),
                        step_callback=_step_logger(logs, fail_rank=1, fail_step=3))
    assert (logs / "failed-once").exists() and _steps(logs, 0) == [1, 2, 3, 3, 4, 5]
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    by_step = {h["step"]: h for h in history}
    assert [by_step[i]["dataset"] for i in range(1, 6)] == ["nli/sick:train"] * 2 + ["sts/stsb:train"] * 3
    assert "dev_spearman" in by_step[2] and "dev_spearman" in by_step[5]  # each phase ends scored
    # each phase decays its own peak lr linearly over its own steps (no warmup at this length)
    assert by_step[1]["lr"] == pytest.approx(1e-4 / 2) and by_step[2]["lr"] == 0.0
    assert by_step[3]["lr"] == pytest.approx(2e-5 * 2 / 3) and by_step[5]["lr"] == 0.0
    assert summary["manifest"]["phases"] == [
        {"name": "nli", "first_step": 1, "last_step": 2, "datasets": ["nli/sick:train"]},
        {"name": "sts", "first_step": 3, "last_step": 5, "datasets": ["sts/stsb:train"]}]
    assert np.isfinite(summary["final_train_loss"])


@pytest.mark.slow
@pytest.mark.s3
@pytest.mark.timeout(900)
def test_checkpoints_and_model_on_s3_and_restart_with_same_name(ray_local, s3, tmp_path, tiny_model_path):  # noqa: F811
    """A job that dies (no retries left) is rerun with the same name: it resumes from S3."""
    from embedforge import storage
    from embedforge.models import resolve_model
    from workflows.train.run import run_train

    output = f"s3://{s3.bucket}/train-test"
    logs = tmp_path / "logs"
    logs.mkdir()
    config = _config(output, tiny_model_path, [STSB], failure={"max_failures": 0})
    with pytest.raises(EngineError, match="failed"):
        run_train(config, step_callback=_step_logger(logs, fail_rank=0, fail_step=3))
    assert _steps(logs) == [1, 2, 3]
    assert any(p.startswith("checkpoints/t/checkpoint_") for p in storage.list_files(output))
    (logs / "rank0.log").unlink()
    summary = run_train(config, step_callback=_step_logger(logs))
    assert _steps(logs) == [3, 4]  # the restarted job continued after the step-2 checkpoint
    assert summary["model"] == f"{output}/model" and storage.is_committed(output)
    _check_export(resolve_model(summary["model"], cache_dir=str(tmp_path / "cache")))

"""Rewards and teacher labels: pure math, prompts, config, then real vLLM, a real embedder and Ray Data."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from embedforge import storage
from embedforge.config import build_config, load_config
from embedforge.errors import ConfigError, InputError
from actors import reward_scorer as P
from workflows.reward.config import RewardConfig
from workflows.reward.mining import select_candidates
from actors.reward_scorer import expected_score, mean_logprob
from workflows.reward.scoring import softmax, spearman, teacher_distribution

pytestmark = pytest.mark.timeout(600)

# ---------------------------------------------------------------- pure


def test_teacher_distribution_sums_to_one_per_query():
    df = pl.DataFrame({"qid": ["a", "a", "a", "b", "b"], "reward": [-1.0, -2.0, -30.0, -0.5, -0.5]})
    out = teacher_distribution(df, temperature=0.5)
    sums = out.group_by("qid").agg(pl.col("teacher_prob").sum())
    assert np.allclose(sums["teacher_prob"].to_numpy(), 1.0)
    a = out.filter(pl.col("qid") == "a")["teacher_prob"].to_numpy()
    assert np.allclose(a, softmax([-1.0, -2.0, -30.0], 0.5)) and a[0] > a[1] > a[2]
    assert np.allclose(out.filter(pl.col("qid") == "b")["teacher_prob"].to_numpy(), [0.5, 0.5])
    # higher temperature flattens the distribution
    flat = teacher_distribution(df, temperature=10.0).filter(pl.col("qid") == "a")["teacher_prob"].to_numpy()
    assert flat.max() < a.max()


def test_expected_score_and_reward_math():
    lp = np.log([0.1, 0.2, 0.7])
    score, mass = expected_score({10: lp[0], 11: lp[1], 12: lp[2], 99: np.log(0.0001)}, [10, 11, 12])
    assert score == pytest.approx((0.2 * 1 + 0.7 * 2) / 2) and mass == pytest.approx(1.0)
    # a score token outside the top log-probs counts as probability 0 (renormalized over the rest)
    score, mass = expected_score({12: np.log(0.5)}, [10, 11, 12])
    assert score == pytest.approx(1.0) and mass == pytest.approx(0.5)
    with pytest.raises(InputError, match="no score token"):
        expected_score({1: -0.1}, [10, 11])
    assert mean_logprob([-1.0, -2.0, -3.0]) == pytest.approx(-2.0)
    with pytest.raises(InputError, match="empty"):
        mean_logprob([])
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)


def test_select_candidates_skips_positives_and_applies_margin():
    docs = ["d0", "d1", "d2", "d3", "d4"]
    scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.5]])
    indices = np.array([[1, 0, 2, 3, 4]])
    out = select_candidates(scores, indices, ["q"], docs, {"q": {"d0"}}, top_k=3)
    assert out["doc_id"].to_list() == ["d1", "d2", "d3"] and out["rank"].to_list() == [1, 2, 3]
    # guard: positive at 0.8, margin 0.05 -> drop anything above 0.75 (d1 at 0.9)
    out = select_candidates(scores, indices, ["q"], docs, {"q": {"d0"}}, 3, {"q": 0.8}, margin=0.05)
    assert out["doc_id"].to_list() == ["d2", "d3", "d4"]


def test_prompts_are_pure_and_keep_the_answer_out():
    msg = P.feedback_message("P: {passage} Q: {query}", " who? ", " Ann wrote it. ")
    assert msg == "P: Ann wrote it. Q: who?"
    assert P.render(msg, None, "\nAnswer:") == msg + "\nAnswer:"
    assert P.render(msg, lambda conv: f"<u>{conv[0]['content']}</u>", "x") == f"<u>{msg}</u>"
    assert P.answer_continuation(" Ann ", chat=True, answer_prefix=" ") == "Ann"
    assert P.answer_continuation("Ann", chat=False, answer_prefix=" ") == " Ann"
    assert P.score_strings(2, "") == ["0", "1", "2"]


def test_config_validates_and_example_loads():
    cfg = load_config(RewardConfig, "configs/reward.yaml")
    assert cfg.llm_feedback.data.split == "train" and cfg.cross_encoder.eval_data.split == "dev"
    with pytest.raises(ConfigError, match="test"):
        build_config(RewardConfig, {"output": "/tmp/x", "llm_feedback": {"data": {"source": "xquad", "split": "test"}}})
    with pytest.raises(ConfigError, match="eval_data"):
        build_config(RewardConfig, {"output": "/tmp/x", "cross_encoder": {"eval_data": {"source": "stsb",
                                                                                          "split": "test"}}})
    with pytest.raises(ConfigError, match="temperature"):
        build_config(RewardConfig, {"output": "/tmp/x", "llm_feedback": {"temperature": 0}})
    with pytest.raises(ConfigError, match="mining.top_kk: unknown key"):
        build_config(RewardConfig, {"output": "/tmp/x", "mining": {"top_kk": 3}})


def test_job_dry_run_and_bad_config(capsys):
    from jobs.reward import main

    assert main(["--config", "configs/reward.yaml", "--dry-run", "--set", "mining.top_k=5"]) == 0
    assert "top_k: 5" in capsys.readouterr().out
    assert main(["--config", "configs/reward.yaml", "--set", "llm_feedback.template=no placeholders"]) == 2


def test_committed_output_of_another_config_is_refused_never_returned(tmp_path):
    """The stale-output bug: a changed config writing to a committed output got the old rows back."""
    from workflows.reward.pipeline import run_reward

    base = {"output": str(tmp_path / "out"), "llm_feedback": {"enabled": False},
            "cross_encoder": {"eval_data": {"source": "stsb", "split": "dev", "limit": 8}}}
    old = build_config(RewardConfig, base)
    writer = storage.ShardedWriter(old.output)
    writer.write("sts_eval-00000", {"sts_eval": pl.DataFrame({"x": [1]}).to_arrow()},
                 {"rows": 1, "config_hash": old.content_hash()})
    writer.finish({"kind": "reward", "config_hash": old.content_hash(), "summary": {"rows": 1}})
    # same config (only where Ray runs and how many actors differ): the committed output is returned
    same = build_config(RewardConfig, base, ["ray.num_cpus=8", "scorer.num_actors=2"])
    assert same.content_hash() == old.content_hash()
    assert run_reward(same)["skipped"] is True
    changed = build_config(RewardConfig, base, ["cross_encoder.max_score=4"])
    assert changed.content_hash() != old.content_hash()
    with pytest.raises(ConfigError, match="committed by another reward config .*overwrite=true"):
        run_reward(changed)
    # not committed yet, but shards of the old config are there: refused too (they would be reused)
    storage.delete(storage.manifest_uri(old.output))
    with pytest.raises(ConfigError, match="holds shards of another reward config"):
        run_reward(changed)


def test_job_refuses_a_changed_config_with_exit_2(tmp_path, capsys):
    from jobs.reward import main

    out = tmp_path / "out"
    sets = ["--set", f"output={out}", "--set", "llm_feedback.enabled=false"]
    storage.commit(str(out), {"kind": "reward", "config_hash": "0" * 16})
    assert main(["--config", "configs/reward.yaml", *sets]) == 2
    err = capsys.readouterr().err
    assert f"reward: output {out} is committed by another config (hash {'0' * 16}; this config's hash is " in err


# ---------------------------------------------------------------- real vLLM


def _reference_logprobs(model, tok, prompt: str, continuation: str) -> list[float]:
    """log p(continuation tokens | prompt) with transformers, same token ids as the engine."""
    import torch

    p_ids = tok.encode(prompt, add_special_tokens=False)
    c_ids = tok.encode(continuation, add_special_tokens=False)
    bos = [tok.bos_token_id] if tok.bos_token_id is not None and p_ids[:1] != [tok.bos_token_id] else []
    ids = torch.tensor([bos + p_ids + c_ids])
    with torch.inference_mode():
        logp = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    start = len(bos) + len(p_ids)
    return [float(logp[start + i - 1, t]) for i, t in enumerate(c_ids)]


def test_reward_matches_transformers(llm_engine, smollm_path):
    import torch
    from transformers import AutoModelForCausalLM

    from actors.reward_scorer import RewardScorer

    scorer = RewardScorer(llm_engine, task="feedback")
    passage = "The Eiffel Tower in Paris was completed in 1889 and is 330 metres tall."
    other = "Photosynthesis converts light energy into chemical energy in plants."
    queries = ["When was the Eiffel Tower completed?", "When was the Eiffel Tower completed?",
               "How tall is the Eiffel Tower?", "How tall is the Eiffel Tower?"]
    passages, answers = [passage, other, passage, other], ["1889", "1889", "330 metres", "330 metres"]
    got = scorer.score_feedback(queries, passages, answers)
    model = AutoModelForCausalLM.from_pretrained(smollm_path, dtype=torch.float32).eval()
    ref = []
    for q, p, a in zip(queries, passages, answers):
        lp = _reference_logprobs(model, llm_engine.tokenizer, scorer.feedback_prompt(q, p),
                                 scorer.feedback_continuation(a))
        ref.append(lp)
        assert got["n_answer_tokens"][len(ref) - 1] == len(lp)
    ref_rewards = np.array([np.mean(r) for r in ref])
    # vLLM runs bf16, the reference fp32: per-token log-probs agree to about 0.2 nats
    assert np.abs(got["reward"] - ref_rewards).max() < 0.25, (got["reward"], ref_rewards)
    # and both put the gold passage above the unrelated one
    assert got["reward"][0] > got["reward"][1] and ref_rewards[0] > ref_rewards[1]
    assert got["reward"][2] > got["reward"][3] and ref_rewards[2] > ref_rewards[3]


def _openmp_runtime():
    """The OpenMP runtime torch loaded (libgomp or libiomp), opened with ctypes."""
    import ctypes

    import torch  # noqa: F401  (loads the runtime)

    with open("/proc/self/maps") as maps:
        paths = {line.split()[-1] for line in maps if "libgomp" in line or "libiomp" in line}
    if not paths:
        pytest.skip("no OpenMP runtime mapped in this process")
    return ctypes.CDLL(sorted(paths)[0])


def test_engine_call_from_a_thread_with_another_openmp_count(llm_engine):
    """The reward stage's ``cpu_attn_impl.hpp ... thread_num == thread_num (1 vs. 2)`` failure.

    Ray Data runs a map actor's ``__call__`` on a pool thread whose OpenMP count is the worker's
    ``OMP_NUM_THREADS=1`` while the engine was started for 2: vLLM planned the attention for 1
    thread, torch's lazy per-thread init raised the count to 2, the kernel refused the step.
    Without the per-call thread count in ``LLMEngine`` this test fails with that message.
    """
    import threading

    assert llm_engine.num_threads == 2, "the fixture engine must compute on 2 threads for this check"
    omp = _openmp_runtime()
    got: dict = {}

    def call():
        omp.omp_set_num_threads(1)  # a Ray worker thread's start (OMP_NUM_THREADS=1); torch not yet used here
        got["max_threads_before"] = omp.omp_get_max_threads()
        try:
            got["out"] = llm_engine.generate(["The capital of France is"], max_tokens=2)
            got["rewards"] = llm_engine.continuation_logprobs(["The capital of France is"], [" Paris"])
        except Exception as e:  # noqa: BLE001  (reported below)
            got["error"] = e

    thread = threading.Thread(target=call)
    thread.start()
    thread.join(timeout=300)
    assert got["max_threads_before"] == 1
    assert "error" not in got, got.get("error")
    assert got["out"][0]["token_ids"] and len(got["rewards"][0]) >= 1


def test_cross_encoder_scores_and_flags_bad_rows(llm_engine):
    from actors.reward_scorer import RewardScorer

    scorer = RewardScorer(llm_engine, task="cross_encoder")
    out = scorer.score_pairs(["A man is playing a guitar.", "", "A dog runs."],
                             ["A man plays the guitar.", "Something.", "The stock market fell."])
    assert out["reason"][0] == "" and out["reason"][1] == "sentence1: empty"
    assert 0.0 <= out["teacher_score"][0] <= 1.0 and 0.0 < out["score_mass"][0] <= 1.0 + 1e-6
    assert np.isnan(out["teacher_score"][1])
    exact = RewardScorer(llm_engine, task="cross_encoder", cross_encoder={"method": "score_tokens"})
    out2 = exact.score_pairs(["A man is playing a guitar."], ["A man plays the guitar."])
    assert 0.0 <= out2["teacher_score"][0] <= 1.0
    # where the top-20 holds all six score tokens both methods read the same distribution
    if out["score_mass"][0] > 0.99 * out2["score_mass"][0]:
        assert out2["teacher_score"][0] == pytest.approx(out["teacher_score"][0], abs=0.05)


# ---------------------------------------------------------------- Ray Data: mining and the pipeline

PASSAGES = [
    "The Eiffel Tower in Paris was completed in 1889.",
    "The Eiffel Tower is made of wrought iron and stands in Paris.",
    "Paris is the capital of France and home to the Louvre.",
    "Photosynthesis converts light into chemical energy in plants.",
    "Chlorophyll makes plant leaves green.",
    "The Amazon river flows through Brazil into the Atlantic.",
    "Mount Everest is the highest mountain on Earth.",
    "Jupiter is the largest planet of the solar system.",
]


def test_mining_never_returns_a_positive(ray_local, minilm_path):
    from workflows.reward.config import MiningConfig
    from workflows.reward.mining import mine_hard_negatives

    corpus = pl.DataFrame({"doc_id": [f"d{i}" for i in range(len(PASSAGES))], "text": PASSAGES})
    queries = pl.DataFrame({"qid": ["q0", "q1", "q2"],
                            "text": ["When was the Eiffel Tower finished?", "Why are leaves green?",
                                     "What is the tallest mountain?"]})
    # q0 has two positives (both Eiffel passages), which are also its two nearest neighbours
    positives = {"q0": {"d0", "d1"}, "q1": {"d4"}, "q2": {"d6"}}
    cfg = MiningConfig(embedder={"model": minilm_path, "batch_size": 4}, top_k=3, batch_size=4)
    mined, pos_sim = mine_hard_negatives(queries, corpus, positives, cfg)
    for qid, docs in positives.items():
        got = mined.filter(pl.col("qid") == qid)
        assert got.height == 3 and not set(got["doc_id"]) & docs
        assert got["rank"].to_list() == [1, 2, 3]
        assert (got["similarity"].to_numpy()[:-1] >= got["similarity"].to_numpy()[1:] - 1e-6).all()
    # the Eiffel question's hardest negative is the Paris passage
    assert mined.filter(pl.col("qid") == "q0")["doc_id"][0] == "d2"
    # guard with margin 0.1: nothing kept above (lowest positive similarity - 0.1)
    guarded, _ = mine_hard_negatives(queries, corpus, positives, cfg.model_copy(update={"false_negative_margin": 0.1}))
    for qid, sim in pos_sim.items():
        assert (guarded.filter(pl.col("qid") == qid)["similarity"].to_numpy() <= sim - 0.1 + 1e-6).all()


def _qa_jsonl(path) -> str:
    rows = []
    for i, (p, q, a) in enumerate([
        (PASSAGES[0], "When was the Eiffel Tower completed?", "1889"),
        (PASSAGES[3], "What does photosynthesis convert light into?", "chemical energy"),
        (PASSAGES[6], "What is the highest mountain on Earth?", "Mount Everest"),
        (PASSAGES[7], "Which planet is the largest?", "Jupiter"),
        (PASSAGES[5], "Where does the Amazon flow into?", "the Atlantic"),
        (PASSAGES[2], "What is the capital of France?", "   "),  # bad: blank answer
    ]):
        rows.append({"qid": f"q{i}", "question": q, "context": p, "answer": a, "lang": "en", "article": f"a{i}"})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_pipeline_end_to_end_on_s3_with_quarantine_and_resume(ray_local, s3, tmp_path, minilm_path, smollm_path):
    from workflows.reward.pipeline import run_reward

    pairs_prefix = f"s3://{s3.bucket}/reward-test/synth"
    synth = pl.DataFrame({"sentence1": ["A man plays a guitar.", "A cat sleeps.", ""],
                          "sentence2": ["Ein Mann spielt Gitarre.", "Das Auto ist rot.", "Leer."],
                          "score": [0.9, 0.05, 0.5], "lang1": ["en"] * 3, "lang2": ["de"] * 3,
                          "translator": ["m"] * 3})
    writer = storage.ShardedWriter(pairs_prefix)
    writer.write("part-0", {"data": synth.to_arrow()})
    writer.finish({"kind": "synthesize"})
    output = f"s3://{s3.bucket}/reward-test/out"
    cfg = build_config(RewardConfig, {
        "output": output,
        "mining": {"embedder": {"model": minilm_path, "batch_size": 8}, "top_k": 2, "batch_size": 8},
        "llm_feedback": {"data": {"source": _qa_jsonl(tmp_path / "qa.jsonl"), "kind": "qa"}, "shard_queries": 2,
                         "batch_size": 8, "temperature": 0.5},
        "cross_encoder": {"eval_data": {"source": "stsb", "split": "dev", "limit": 8},
                          "pairs": {"source": pairs_prefix, "kind": "scored_pairs"}, "batch_size": 4},
        "scorer": {"engine": {"model": smollm_path, "max_model_len": 1024}},
        "max_bad_fraction": 0.3,
    })
    summary = run_reward(cfg)
    assert storage.is_committed(output) and summary["manifest"]["quarantined"] == 2
    fb = pl.from_arrow(storage.read_output(output, "feedback"))
    assert fb["qid"].n_unique() == 5 and fb.height == 5 * 3
    sums = fb.group_by("qid").agg(pl.col("teacher_prob").sum(), pl.col("is_positive").sum())
    assert np.allclose(sums["teacher_prob"].to_numpy(), 1.0) and (sums["is_positive"] == 1).all()
    gold = dict(zip(fb.filter(pl.col("is_positive"))["qid"], fb.filter(pl.col("is_positive"))["doc_id"]))
    assert all(gold[q] != d for q, d in fb.filter(~pl.col("is_positive")).select("qid", "doc_id").iter_rows())
    assert fb["reward"].is_finite().all() and (fb["reward"] < 0).all()
    assert 0.0 <= summary["llm_feedback"]["gold_top1"] <= 1.0
    sts = pl.from_arrow(storage.read_output(output, "sts_teacher"))
    assert sts.height == 2 and sts["score"].to_list() == pytest.approx([0.9, 0.05])
    assert sts["translator"].to_list() == ["m", "m"] and sts["teacher_score"].is_between(0, 1).all()
    quarantine = pl.from_arrow(storage.read_output(output, "quarantine"))
    assert sorted(quarantine["stage"].to_list()) == ["llm_feedback", "sts_teacher"]
    assert any("answer" in r for r in quarantine["reason"]) and any("sentence1: empty" in r for r in quarantine["reason"])
    assert storage.read_output(output, "sts_eval").num_rows == 8
    assert "spearman" in summary["cross_encoder"]["sts_eval"]
    assert {u.rsplit("/", 1)[1] for u in summary["report"]} == {"reward_distribution.png", "teacher_vs_gold.png",
                                                                 "summary.json"}
    assert storage.read_bytes(summary["report"][0])[:4] == b"\x89PNG"
    again = run_reward(cfg)
    assert again["skipped"] and again["manifest"]["committed_at"] == summary["manifest"]["committed_at"]
    with pytest.raises(ConfigError, match="committed by another reward config"):
        run_reward(cfg.model_copy(update={"llm_feedback": cfg.llm_feedback.model_copy(update={"temperature": 2.0})}))


@pytest.mark.slow
def test_reward_stage_runs_with_a_two_thread_engine_in_ray_data(ray_local, tmp_path, minilm_path, smollm_path):
    """The real reward stage (Ray Data, vLLM on CPU) with the engine of configs/reward.yaml: 2 CPUs.

    This is the configuration that failed with ``thread_num (1 vs. 2)``: Ray Data calls the
    scorer on a pool thread that starts with ``OMP_NUM_THREADS=1``.
    """
    from workflows.reward.pipeline import run_reward

    shipped = load_config(RewardConfig, "configs/reward.yaml").scorer.engine
    assert shipped.num_cpus == 2
    cfg = build_config(RewardConfig, {
        "output": str(tmp_path / "out"),
        "mining": {"embedder": {"model": minilm_path, "batch_size": 8}, "top_k": 2, "batch_size": 8},
        "llm_feedback": {"data": {"source": _qa_jsonl(tmp_path / "qa.jsonl"), "kind": "qa", "limit": 4},
                         "shard_queries": 2, "batch_size": 4},
        "cross_encoder": {"eval_data": {"source": "stsb", "split": "dev", "limit": 4}, "batch_size": 4},
        "scorer": {"engine": {**shipped.model_dump(), "model": smollm_path, "max_model_len": 1024}},
        "max_bad_fraction": 0.1,
    })
    summary = run_reward(cfg)
    # the file's blank-answer row is quarantined when it is read, before the limit
    assert storage.is_committed(cfg.output) and summary["quarantined"] == 1
    fb = pl.from_arrow(storage.read_output(cfg.output, "feedback"))
    assert fb["qid"].n_unique() == 4 and fb.height == 4 * 3
    assert fb["reward"].is_finite().all() and (fb["reward"] < 0).all()
    sums = fb.group_by("qid").agg(pl.col("teacher_prob").sum())
    assert np.allclose(sums["teacher_prob"].to_numpy(), 1.0)
    # the LLM prefers the passage that holds the answer for most questions
    assert summary["llm_feedback"]["gold_top1"] >= 0.5
    sts = pl.from_arrow(storage.read_output(cfg.output, "sts_eval"))
    assert sts.height == 4 and sts["teacher_score"].is_between(0, 1).all()

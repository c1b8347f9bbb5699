"""CIPHER debate: protocol, answer parsing and voting (pure); CIPHER math and the transformers agent on a
tiny random Llama (exact hand computations); the Serve app over real HTTP with SmolLM2; the eval job."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest

from workflows.debate import protocol as P

REPO = Path(__file__).resolve().parents[1]

WORDS = ["solve", "math", "problem", "answer", "agent", "solution", "the", "is", "of", "to", "a", "+", "*", "-",
         "=", "####", "1", "2", "3", "4", "5", "6", "7", "8", "9", "0", "what", "these", "are", "from", "other",
         "one", "using", "can", "you", "give", "updated", "response", "step", "by", "user", "assistant", "end"]
SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|> {% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}")


def _tokenizer(words):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + list(words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>", additional_special_tokens=SPECIALS[3:])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _tiny_llama(folder: Path, words=WORDS, seed: int = 0, embedding_noise: float = 0.0) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _tokenizer(words)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=None)
    model = LlamaForCausalLM(cfg)
    if embedding_noise:
        with torch.no_grad():
            g = torch.Generator().manual_seed(seed + 1)
            model.model.embed_tokens.weight.add_(embedding_noise * torch.randn(model.model.embed_tokens.weight.shape,
                                                                               generator=g))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tiny_paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-llama")
    return {
        "a": _tiny_llama(root / "a", seed=0),
        # same tokenizer and weights, different embedding matrix: a heterogeneous receiver
        "b": _tiny_llama(root / "b", seed=0, embedding_noise=0.5),
        # a different tokenizer (words in another order, one extra)
        "other": _tiny_llama(root / "other", words=list(reversed(WORDS)) + ["extra"], seed=3),
    }


@pytest.fixture(scope="module")
def tiny_agent(tiny_paths):
    from actors.cipher_agent import CipherAgent, CipherAgentConfig

    return CipherAgent(CipherAgentConfig(model=tiny_paths["a"], dtype="float32", torch_threads=1,
                                         max_context_tokens=512))


# ---------------------------------------------------------------------------------------------- pure


@pytest.mark.parametrize("text,expected", [
    ("so 3+4 = 7\n#### 7", "7"),
    ("#### 1,234", "1234"),
    ("The answer is 42.", "42"),
    ("the answer is $1,234", "1234"),
    ("Final answer: \\boxed{18}", "18"),
    ("2*3 = 6 and 6+1 = 7", "7"),
    ("I think it is 12 apples, maybe 15", "15"),
    ("#### 5 but later The answer is 9", "5"),
    ("It costs $3.50 in total", "3.5"),
    ("answer = -4", "-4"),
    ("#### 42.0", "42"),
    ("no numbers here", None),
])
def test_extract_answer(text, expected):
    assert P.extract_answer(text) == expected


def test_answers_equal_and_normalize():
    assert P.answers_equal("1234", "1,234")
    assert P.answers_equal("42.0", "42")
    assert not P.answers_equal(None, "1")
    assert not P.answers_equal("41", "42")
    assert P.normalize_number("$1,234.50") == "1234.5"
    assert P.normalize_number("abc") is None


def test_majority_vote_and_final_answer():
    assert P.majority_vote(["3", "4", "4"]) == "4"
    assert P.majority_vote(["3", "4"]) == "3"  # tie: first given
    assert P.majority_vote([None, None]) is None
    assert P.majority_vote([None, "5"]) == "5"
    assert P.final_answer("cipher", [1.0, 0.2], ["9", "7"]) == "7"  # the low-temperature agent
    assert P.final_answer("natural", [1.0, 0.2, 0.5], ["9", "7", "9"]) == "9"
    assert P.final_answer("single", [0.2], ["3"]) == "3"
    with pytest.raises(ValueError, match="one agent"):
        P.final_answer("single", [0.2, 1.0], ["3", "4"])
    with pytest.raises(ValueError, match="at least 2 agents"):
        P.check_debate("cipher", 1, 2)
    with pytest.raises(ValueError, match="exactly 1 agent"):
        P.check_debate("single", 2, 1)


def test_vote_names_ties_and_tie_rules():
    v = P.vote(["3", "4", "4"])
    assert (v.answer, v.tie, v.counts) == ("4", False, {"3": 1, "4": 2})
    # Du et al.'s most_frequent: the tied answer given first in agent order wins
    v = P.vote(["7", None, "5"])
    assert (v.answer, v.tie, v.tied) == ("7", True, ["7", "5"])
    v = P.vote(["7", "5", "5", "7"])
    assert (v.answer, v.tie, v.tied) == ("7", True, ["7", "5"])
    assert P.vote(["7", "5", "6"], "lowest_temperature", [1.0, 0.2, 0.5]).answer == "5"
    assert P.vote(["7", "7", "5", "5"], "lowest_temperature", [1.0, 1.0, 1.0, 0.2]).answer == "5"
    v = P.vote(["7", "5"], "none")
    assert v.answer is None and v.tie
    with pytest.raises(ValueError, match="one temperature per answer"):
        P.vote(["1", "2"], "lowest_temperature")
    # CIPHER: the lowest temperature's answer unless majority is asked; the tally is kept either way
    d = P.decide("cipher", [1.0, 0.2, 1.0], ["9", "7", "9"])
    assert d.answer == "7" and d.counts == {"9": 2, "7": 1} and not d.tie
    assert P.decide("cipher", [1.0, 0.2, 1.0], ["9", "7", "9"], cipher_final="majority").answer == "9"
    assert P.decide("natural", [1.0] * 3, ["1", "2", "3"], tie_break="none").answer is None
    assert P.decide("natural", [1.0] * 3, ["1", "2", "3"]).tie


def _replies(round_: int, n: int):
    return [[P.AgentReply(f"agent {i} round {round_} #### {10 * round_ + i}", 5)] for i in range(n)]


def test_full_history_as_du_et_al():
    """Du et al.'s contexts: [user q, (assistant own_r, user others_r) per past round]."""
    q = "What is the result of 1+2*3?"
    history = [_replies(0, 3), _replies(1, 3)]
    convs = P.next_round([q], "natural", ["m"] * 3, history, prompts="du_arithmetic")
    assert len(convs) == 3
    turns = convs[1][0]
    assert [t.role for t in turns] == ["user", "assistant", "user", "assistant", "user"]
    assert turns[0].text() == f"{q} Make sure to state your answer at the end of the response."
    assert turns[1].text() == "agent 1 round 0 #### 1" and turns[3].text() == "agent 1 round 1 #### 11"
    others0, others1 = turns[2].text(), turns[4].text()
    assert others0.startswith("These are the recent/updated opinions from other agents: ")
    assert "```agent 0 round 0 #### 0```" in others0 and "```agent 2 round 0 #### 2```" in others0
    assert "agent 1 round" not in others0 and "round 1" not in others0
    assert "```agent 0 round 1 #### 10```" in others1 and others1.index("agent 0") < others1.index("agent 2")
    # history="last": only the previous round (the question, own last answer, the others' last answers)
    last = P.next_round([q], "natural", ["m"] * 3, history, prompts="du_arithmetic", memory="last")[1][0]
    assert [t.role for t in last] == ["user", "assistant", "user"] and last[1].text() == turns[3].text()
    assert last[2].text() == turns[4].text()
    # the GSM prompts repeat the original problem in every update turn (Du et al.'s gen_gsm.py)
    gsm = P.next_round(["Tom has 3 apples."], "natural", ["m"] * 3, history[:1], prompts="du_gsm")[0][0]
    assert "\\boxed{answer}" in gsm[0].text() and "The original math problem is Tom has 3 apples.." in gsm[2].text()
    with pytest.raises(ValueError, match="unknown prompt set"):
        P.round_conversation(q, 0, None, prompts="nope")


def test_cipher_history_carries_own_vectors():
    """In CIPHER mode the agent's own past answers are its vectors, the others' are theirs, in round order."""
    q = "What is 1+2?"
    history = [[[P.AgentReply("x", 2, vectors={"m": np.full((2, 4), 10.0 * r + i)})] for i in range(2)]
               for r in range(2)]
    turns = P.next_round([q], "cipher", ["m", "m"], history, prompts="du_gsm")[0][0]
    slots = [s for t in turns for s in t.segments if isinstance(s, P.Vectors)]
    assert [(s.sender, float(s.data[0, 0])) for s in slots] == [(0, 0.0), (1, 1.0), (0, 10.0), (1, 11.0)]


def test_render_segments_places_vectors_inside_template():
    v1, v2 = P.Vectors(np.ones((3, 4)), 1), P.Vectors(np.zeros((2, 4)), 2)
    turns = [P.Turn("user", ["Q?"]), P.Turn("assistant", [v1]), P.Turn("user", ["others: ", v2, " update"])]

    def template(messages):
        return "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages) + "<assistant>"

    segs = P.render_segments(turns, template)
    assert segs == ["<user>Q?</user><assistant>", v1, "</assistant><user>others: ", v2, " update</user><assistant>"]


# ---------------------------------------------------------------------------------------------- CIPHER math


def test_expected_embedding_and_stop_rule_pure():
    import torch

    from embedforge import cipher as C

    torch.manual_seed(0)
    E = torch.randn(10, 4)
    logits = torch.randn(3, 10)
    for T in (0.5, 1.0, 2.0):
        hand = torch.stack([sum(math.exp(logits[b, v] / T) * E[v] for v in range(10)) /
                            sum(math.exp(logits[b, v] / T) for v in range(10)) for b in range(3)])
        assert torch.allclose(C.expected_embedding(logits, E, T), hand, atol=1e-5)
    assert torch.equal(C.expected_embedding(logits, E, 0.0), E[logits.argmax(-1)])  # T=0: greedy
    forced = torch.zeros(2, 10)
    forced[0, 7] = 50.0   # EOS dominates -> the expected embedding is E[7] -> nearest is EOS -> stop
    forced[1, 3] = 50.0
    step = C.cipher_step(forced, E, 1.0, eos_ids=[7])
    assert step["token"].tolist() == [7, 3] and step["stop"].tolist() == [True, False]
    with pytest.raises(ValueError, match="do not share a vocabulary"):
        C.expected_embedding(logits, torch.randn(11, 4), 1.0)


def test_agent_step_equals_hand_computation(tiny_agent):
    """The agent's first two emitted vectors equal softmax(logits/T) @ E computed by full forward passes."""
    import torch

    agent, T = tiny_agent, 0.7
    prompt = ["solve the math problem what is 1 + 2"]
    out = agent.generate([prompt], temperature=T, max_tokens=2)[0]
    ids = agent.tokenizer(prompt[0], add_special_tokens=False)["input_ids"]
    E = agent.model.get_input_embeddings().weight.detach()
    with torch.no_grad():
        logits = agent.model(input_ids=torch.tensor([ids])).logits[0, -1]
        e1 = torch.softmax(logits / T, -1) @ E
        # step 2 without any cache: the prompt embeddings followed by e1
        x = torch.cat([E[torch.tensor(ids)], e1[None]])[None]
        e2 = torch.softmax(agent.model(inputs_embeds=x).logits[0, -1] / T, -1) @ E
    got = torch.as_tensor(out["embeddings"])
    assert got.shape == (2, 16) and not out["stopped"]
    assert torch.allclose(got[0], e1, atol=1e-5) and torch.allclose(got[1], e2, atol=1e-5)
    assert out["tokens"][0] == int(torch.nn.functional.cosine_similarity(E, e1[None]).argmax())


def test_batched_left_padding_matches_single(tiny_agent):
    short, long = ["what is 1 + 2"], ["solve the math problem of the agent what is 3 * 4 + 5"]
    both = tiny_agent.generate([short, long], temperature=0.5, max_tokens=4)
    alone = [tiny_agent.generate([p], temperature=0.5, max_tokens=4)[0] for p in (short, long)]
    for b, a in zip(both, alone):
        assert b["tokens"] == a["tokens"]
        np.testing.assert_allclose(b["embeddings"], a["embeddings"], atol=1e-4)


def test_mixed_temperature_batch_matches_separate_batches(tiny_agent):
    """Agents at different temperatures in one lock-step batch decode exactly as in their own batches."""
    prompts = [["what is 1 + 2"], ["solve the math problem of the agent what is 3 * 4 + 5"], ["what is 2 * 2"]]
    temps = [0.0, 0.7, 1.5]
    mixed = tiny_agent.generate(prompts, temperature=temps, max_tokens=4, receivers={})
    for p, t, m in zip(prompts, temps, mixed):
        alone = tiny_agent.generate([p], temperature=t, max_tokens=4, receivers={})[0]
        assert m["tokens"] == alone["tokens"]
        np.testing.assert_allclose(m["embeddings"], alone["embeddings"], atol=1e-4)
    from embedforge.errors import InputError

    with pytest.raises(InputError, match="2 temperatures for 3 prompts"):
        tiny_agent.generate(prompts, temperature=[0.1, 0.2], max_tokens=2)


def test_token_distribution_per_row_temperatures():
    import torch

    from embedforge import cipher as C

    logits = torch.randn(3, 7)
    rows = C.token_distribution(logits, [0.0, 0.5, 2.0])
    assert torch.equal(rows[0], C.token_distribution(logits[:1], 0.0)[0])
    assert torch.allclose(rows[1], torch.softmax(logits[1] / 0.5, -1)) and torch.allclose(rows[2], torch.softmax(
        logits[2] / 2.0, -1))
    with pytest.raises(ValueError, match="2 temperatures"):
        C.token_distribution(logits, [0.1, 0.2])
    E = torch.randn(7, 4)
    step = C.cipher_step(logits, E, 0.5, [0], {"self": E, "other": E.clone()})
    assert step["messages"]["self"] is step["embedding"]  # the sender's own matrix: no second product
    assert torch.allclose(step["messages"]["other"], step["embedding"])


def test_agent_eos_stop_rule(tiny_agent):
    """Force the logits: EOS dominant -> stops at once; another token dominant -> runs to max_tokens."""
    import torch

    agent = tiny_agent
    head = agent.model.lm_head
    try:
        for token, expect_len in ((2, 0), (10, 5)):
            forced = torch.nn.Linear(16, head.out_features, bias=True)
            with torch.no_grad():
                forced.weight.zero_()
                forced.bias.zero_()
                forced.bias[token] = 60.0
            agent.model.lm_head = forced
            out = agent.generate([["what is 1 + 2"]], temperature=1.0, max_tokens=5)[0]
            assert len(out["tokens"]) == expect_len and out["stopped"] == (token == 2)
            if expect_len:
                assert out["tokens"] == [10] * 5
                np.testing.assert_allclose(out["embeddings"][0], agent.embedding_matrix[10].numpy(), atol=1e-4)
    finally:
        agent.model.lm_head = head


def test_splicing_puts_vectors_where_the_prompt_says(tiny_agent):
    import torch

    agent = tiny_agent
    E = agent.embedding_matrix
    v = P.Vectors(np.full((3, 16), 7.0, dtype=np.float32), sender=1)
    w = P.Vectors(np.full((2, 16), -3.0, dtype=np.float32), sender=2)
    turns = [P.Turn("user", ["what is 1 + 2"]), P.Turn("assistant", [w]),
             P.Turn("user", [P.OTHERS_INTRO, P.ONE_SOLUTION, v, P.UPDATE_PROMPT])]
    segments = P.render_segments(turns, agent._apply_template)
    embeds, n_text = agent.assemble(segments)
    # expected layout: token ids of each text piece, with the vector rows in between
    rows, kinds = [], []
    for s in segments:
        if isinstance(s, P.Vectors):
            rows.append(torch.as_tensor(s.data))
            kinds += [f"v{s.sender}"] * len(s)
        else:
            ids = agent.tokenizer(s, add_special_tokens=False)["input_ids"]
            rows.append(E[torch.tensor(ids)])
            kinds += ["t"] * len(ids)
    assert torch.equal(embeds, torch.cat(rows))
    pos_w = [i for i, k in enumerate(kinds) if k == "v2"]
    pos_v = [i for i, k in enumerate(kinds) if k == "v1"]
    assert len(pos_w) == 2 and len(pos_v) == 3 and pos_w[-1] < pos_v[0]
    assert torch.all(embeds[pos_v] == 7.0) and torch.all(embeds[pos_w] == -3.0)
    # the slot for the others' solution follows "One agent solution:" and precedes the update prompt
    im_start = agent.tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert n_text == kinds.count("t") and embeds.shape[0] == n_text + 5
    # left padding in a batch keeps the vectors at the same offsets from the end
    padded, mask, pos = agent.left_pad([embeds, embeds[:4]])
    offset = padded.shape[1] - embeds.shape[0]
    assert offset == 0 and torch.all(padded[0, pos_v] == 7.0)
    assert mask[1].sum() == 4 and torch.equal(padded[1, -4:], embeds[:4]) and pos[1, -1] == 3
    assert torch.equal(embeds[0], E[im_start])


def test_receiver_matrix_rule(tiny_paths, tiny_agent):
    """Sender a, receiver b (same tokenizer, other embeddings): b's message = softmax(logits_a/T) @ E_b."""
    import torch

    from actors.cipher_agent import read_embedding_matrix

    agent, T = tiny_agent, 0.9
    Ea, Eb = agent.embedding_matrix, read_embedding_matrix(tiny_paths["b"])
    assert not torch.allclose(Ea, Eb)
    prompt = ["what is 1 + 2"]
    out = agent.generate([prompt], T, 3, {"a": agent.receiver_matrix(tiny_paths["a"]),
                                          "b": agent.receiver_matrix(tiny_paths["b"])})[0]
    ids = agent.tokenizer(prompt[0], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        probs = torch.softmax(agent.model(input_ids=torch.tensor([ids])).logits[0, -1] / T, -1)
    n = out["embeddings"].shape[0]
    assert n >= 1
    np.testing.assert_allclose(out["messages"]["b"][0], (probs @ Eb).numpy(), atol=1e-5)
    np.testing.assert_allclose(out["messages"]["a"], out["embeddings"], atol=1e-6)  # own matrix: what was fed back
    assert not np.allclose(out["messages"]["b"], out["messages"]["a"])


def test_tokenizer_mismatch_is_a_clear_error(tiny_paths, tiny_agent):
    from embedforge.cipher import TokenizerMismatchError

    with pytest.raises(TokenizerMismatchError, match="must share a tokenizer"):
        tiny_agent.receiver_matrix(tiny_paths["other"])


def test_cipher_debate_on_tiny_models(tiny_paths, tiny_agent):
    """Two heterogeneous agents (a, b), two rounds, in process: vectors flow in the receiver's space."""
    from actors.cipher_agent import CipherAgent, CipherAgentConfig

    agent_b = CipherAgent(CipherAgentConfig(model=tiny_paths["b"], dtype="float32", torch_threads=1,
                                         max_context_tokens=512))
    agents, models = [tiny_agent, agent_b], ["a", "b"]
    receivers = {"a": tiny_paths["a"], "b": tiny_paths["b"]}
    history: list = []
    for r in range(2):
        convs = P.next_round(["what is 1 + 2 * 3"], "cipher", models, history)
        history.append([ag.respond(c, t, 3, receivers) for ag, c, t in zip(agents, convs, (0.1, 1.0))])
        for reply in (p[0] for p in history[-1]):
            assert set(reply.vectors) == {"a", "b"} and reply.vectors["a"].shape[0] == reply.completion_tokens
    slots = [s for s in convs[1][0][2].segments if isinstance(s, P.Vectors)]
    assert slots and slots[0].sender == 0


# ---------------------------------------------------------------------------------------------- text agent


class FakeLLMEngine:
    """Counts one token per word of the rendered chat and records each ``chat`` call's size."""

    def __init__(self, budget: int):
        from types import SimpleNamespace

        scheduler = SimpleNamespace(max_num_batched_tokens=budget)
        self.llm = SimpleNamespace(llm_engine=SimpleNamespace(vllm_config=SimpleNamespace(scheduler_config=scheduler)))
        self.model_path = "fake"
        self.calls: list[int] = []

    def apply_chat_template(self, conversation):
        return " ".join(m["content"] for m in conversation)

    def count_tokens(self, texts):
        return [len(t.split()) for t in texts]

    def chat(self, conversations, max_tokens, temperature):
        self.calls.append(len(conversations))
        return [{"text": f"#### {c[0]['content'].split()[-1]}", "token_ids": [1, 2]} for c in conversations]


def test_text_agent_sampled_turns_prefill_in_one_step():
    from actors.text_agent import TextAgent
    from embedforge.errors import InputError

    engine = FakeLLMEngine(budget=100)
    agent = TextAgent(engine=engine)
    convs = [[P.Turn("user", [" ".join(["w"] * 30) + f" {i}"])] for i in range(7)]  # 31 tokens each
    replies = agent.respond(convs, temperature=1.0, max_tokens=4)
    assert engine.calls == [3, 3, 1]  # 3 x 31 <= 100 < 4 x 31
    assert [r.text for r in replies] == [f"#### {i}" for i in range(7)]  # order kept across groups
    engine.calls.clear()
    agent.respond(convs, temperature=0.0, max_tokens=4)
    assert engine.calls == [7]  # greedy requests have no generator: one call
    with pytest.raises(InputError, match="conversation 0 has 101 prompt tokens"):
        agent.respond([[P.Turn("user", [" ".join(["w"] * 101)])]], temperature=0.5, max_tokens=4)


@pytest.mark.timeout(600)
def test_text_agent_sampled_batch_above_one_step_on_vllm(llm_engine):
    """Sampled turns whose prompts exceed one scheduler step (vLLM on CPU fails on chunked seeded prefill)."""
    from actors.text_agent import TextAgent

    agent = TextAgent(engine=llm_engine)
    budget = agent.step_token_budget()
    question = "Tom has " + ", ".join(f"{i} apples" for i in range(60)) + ". How many apples does Tom have?"
    n_tokens = llm_engine.count_tokens([llm_engine.apply_chat_template(P.to_chat(P.round_conversation(question, 0,
                                                                                                      None)))])[0]
    n = budget // n_tokens + 2
    convs = [P.round_conversation(question, 0, None) for _ in range(n)]
    assert n * n_tokens > budget and len(agent._groups([P.to_chat(c) for c in convs], 1.0)) > 1
    replies = agent.respond(convs, temperature=1.0, max_tokens=4)
    assert len(replies) == n and all(0 < r.completion_tokens <= 4 for r in replies)
    assert all(abs(r.prompt_tokens - n_tokens) <= 1 for r in replies)


# ---------------------------------------------------------------------------------------------- Serve over HTTP

API_KEY = "debate-test-key-123"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def debate_url(ray_local, smollm_path, tmp_path_factory):
    from ray import serve

    from embedforge.config import build_config
    from workflows.debate.app import build_debate_app
    from workflows.debate.config import DebateConfig
    from workflows.serve.run import wait_healthy

    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text(f"# test keys\n{API_KEY}\n")
    port = _free_port()
    config = build_config(DebateConfig, {
        "models": {"smollm": smollm_path},
        "defaults": {"rounds": 2, "max_tokens": 24, "temperatures": [0.2, 1.0]},
        "limits": {"max_body_bytes": 4096, "max_tokens": 64, "request_timeout_s": 300},
        "engine": {"max_model_len": 2048, "kv_cache_gb": 1},
        "autoscaling": {"min_replicas": 1, "max_replicas": 1},
        "agent_deployment": {"num_cpus": 1, "torch_threads": 1},
        "auth": {"mode": "api_keys", "api_keys_env": None, "api_keys_file": str(keys)},
        "http": {"host": "127.0.0.1", "port": port},
    })
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_debate_app(config), name="debate-test", route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, 300)
        yield url
    finally:
        serve.shutdown()


def _post(url, body, key=API_KEY, timeout=300):
    import httpx

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{url}/v1/debate", json=body, headers=headers, timeout=timeout)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("mode", ["cipher", "natural"])
def test_two_agent_two_round_debate_over_http(debate_url, mode):
    body = {"question": "What is the result of 3+4*2+5-1*6?", "mode": mode,
            "agents": [{"model": "smollm", "temperature": 0.2}, {"model": "smollm", "temperature": 1.0}],
            "rounds": 2, "max_tokens": 24}
    r = _post(debate_url, body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["mode"] == mode and len(out["rounds"]) == 2
    for rnd in out["rounds"]:
        assert [m["agent"] for m in rnd["messages"]] == [0, 1]
        for m in rnd["messages"]:
            assert isinstance(m["text"], str) and 0 <= m["completion_tokens"] <= 24
            assert m["answer"] == P.extract_answer(m["text"])
    assert any(m["text"].strip() for rnd in out["rounds"] for m in rnd["messages"])
    # round 2 prompts carry the others' messages: longer than round 1 prompts
    assert out["rounds"][1]["messages"][0]["prompt_tokens"] > out["rounds"][0]["messages"][0]["prompt_tokens"]
    last = [m["answer"] for m in out["rounds"][-1]["messages"]]
    expected = last[0] if mode == "cipher" else P.majority_vote(last)
    assert out["final_answer"] == expected
    assert out["usage"]["completion_tokens"] == sum(m["completion_tokens"] for rnd in out["rounds"]
                                                    for m in rnd["messages"])
    assert len(out["timings"]["rounds_s"]) == 2 and out["timings"]["total_s"] > 0


@pytest.mark.timeout(600)
def test_single_agent_over_http(debate_url):
    r = _post(debate_url, {"question": "What is 2+2?", "mode": "single", "max_tokens": 16})
    assert r.status_code == 200, r.text
    out = r.json()
    assert len(out["rounds"]) == 1 and len(out["rounds"][0]["messages"]) == 1
    assert out["agents"] == [{"model": "smollm", "temperature": 0.2}]


@pytest.mark.timeout(300)
def test_bad_requests_get_4xx(debate_url):
    good = {"question": "What is 2+2?", "mode": "cipher", "rounds": 1, "max_tokens": 4}
    assert _post(debate_url, good, key=None).status_code == 401
    assert _post(debate_url, good, key="wrong-key").status_code == 401
    cases = [
        ({**good, "mode": "telepathy"}, 422, "mode"),
        ({**good, "question": ""}, 422, "question"),
        ({k: v for k, v in good.items() if k != "question"}, 422, "question"),
        ({**good, "agents": [{"model": "smollm", "temperature": -1}]}, 422, "temperature"),
        ({**good, "unknown": 1}, 422, "unknown"),
        ({**good, "max_tokens": 1000}, 400, "max_tokens"),
        ({**good, "agents": [{"model": "smollm", "temperature": 0.2}]}, 400, "at least 2 agents"),
        ({**good, "mode": "single", "agents": [{"temperature": 0.2}, {"temperature": 1.0}]}, 400, "exactly 1 agent"),
        ({**good, "agents": [{"model": "nope", "temperature": 0.2}, {"temperature": 1.0}]}, 404, "nope"),
    ]
    for body, status, needle in cases:
        r = _post(debate_url, body)
        assert r.status_code == status, (body, r.text)
        assert needle in r.text, r.text
    big = {**good, "question": "x" * 5000}
    r = _post(debate_url, big)
    assert r.status_code == 413 and "body_too_large" in r.text


# ---------------------------------------------------------------------------------------------- eval + configs


def test_configs_validate_and_bad_config_exits_2():
    from embedforge.config import load_config
    from jobs.debate import main as debate_main
    from jobs.debate_eval import main as eval_main
    from workflows.debate.config import DebateConfig, DebateEvalConfig

    assert load_config(DebateConfig, REPO / "configs" / "debate.yaml").defaults.rounds == 3
    assert load_config(DebateEvalConfig, REPO / "configs" / "debate_eval.yaml").data.split == "test"
    assert eval_main(["--config", str(REPO / "configs" / "debate_eval.yaml"), "--set", "temperatures=[0.2]"]) == 2
    assert debate_main(["--config", str(REPO / "configs" / "debate.yaml"), "--set", "limits.max_rounds=2"]) == 2
    assert eval_main(["--config", str(REPO / "configs" / "debate_eval.yaml"), "--dry-run"]) == 0


def test_arithmetic_wilson_summary_and_plot(tmp_path):
    from workflows.debate import evaluate as E

    a, b = E.arithmetic_problems(5, seed=7), E.arithmetic_problems(5, seed=7)
    assert a == b and a != E.arithmetic_problems(5, seed=8)
    nums = [int(x) for x in re.findall(r"\d+", a[0]["question"])]
    assert int(a[0]["gold"]) == nums[0] + nums[1] * nums[2] + nums[3] - nums[4] * nums[5]
    low, high = E.wilson_interval(7, 20)
    assert 0.15 < low < 0.35 < high < 0.6  # Wilson 95% for 7/20: [0.181, 0.567]
    assert abs(low - 0.1812) < 1e-3 and abs(high - 0.5671) < 1e-3
    recs = [{"dataset": "arithmetic", "mode": m, "correct": c, "completion_tokens": 10, "prompt_tokens": 50,
             "seconds": 0.5} for m, c in [("cipher", True), ("cipher", False), ("natural", True), ("natural", True)]]
    rows = E.summarize(recs)
    by = {(r["dataset"], r["mode"]): r for r in rows}
    assert by[("arithmetic", "cipher")]["accuracy"] == 0.5 and by[("all", "natural")]["correct"] == 2
    assert "| arithmetic | cipher | 2 | 0.500 |" in E.markdown_table(rows)
    E.plot_accuracy(rows, str(tmp_path / "a.png"))
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"


class FakeDebater:
    """A fake model for the protocol: answers from the conversation it gets, and records every call.

    Round 0: agent k (by temperature order within a call) answers ``answers0[k]``; later rounds: the
    most common answer among the 'other agents' quoted in its last user turn (it is persuaded).
    """

    def __init__(self, answers0, by_temperature=None):
        self.answers0 = answers0
        self.by_temperature = by_temperature or {}
        self.calls = []

    def respond(self, conversations, temperature, max_tokens, receivers=None):
        self.calls.append({"n": len(conversations), "temperature": temperature,
                           "turns": [len(c) for c in conversations]})
        out = []
        for k, turns in enumerate(conversations):
            if len(turns) == 1:
                answer = (self.by_temperature.get(temperature) if isinstance(temperature, float) else None) \
                    or self.answers0[k]
            else:
                quoted = re.findall(r"#### (\d+)", turns[-1].text())
                answer = max(quoted, key=quoted.count)
            out.append(P.AgentReply(f"so #### {answer}", 3, prompt_tokens=sum(len(t.text()) for t in turns)))
        return out


def test_debate_batch_on_a_fake_model_runs_du_protocol():
    from workflows.debate import evaluate as E
    from workflows.debate.config import DebateEvalConfig

    cfg = DebateEvalConfig.model_validate({"natural_temperatures": [1.0, 1.0, 1.0], "rounds": 2})
    problems = [{"qid": "q0", "dataset": "arithmetic", "question": "What is the result of 1+2?", "gold": "3"}]
    # three agents at one temperature share one call per round; round 1 sees the full history
    fake = FakeDebater(["3", "4", "4"])
    out = E.debate_batch(fake, "natural", problems, [1.0, 1.0, 1.0], 2, 8, "m", None, 10, cfg)[0]
    assert [c["n"] for c in fake.calls] == [3, 3] and [c["turns"] for c in fake.calls] == [[1, 1, 1], [3, 3, 3]]
    assert [m["answer"] for m in out["transcript"][0]] == ["3", "4", "4"]
    # agent 0 reads 4 and 4 -> 4; agents 1 and 2 read 3 and 4 -> a tie in the quotes, the first quoted wins
    assert out["agent_answers"] == ["4", "3", "3"] and out["final_answer"] == "3" and not out["tie"]
    assert out["votes"] == {"4": 1, "3": 2}
    # CIPHER: both agents in one call, one temperature per conversation; final = the low-temperature agent
    fake = FakeDebater(["5", "6"])
    out = E.debate_batch(fake, "cipher", problems, [0.2, 1.0], 1, 8, "m", {"m": "m"}, 10, cfg)[0]
    assert fake.calls[0]["temperature"] == [0.2, 1.0] and out["final_answer"] == "5" and out["tie"]
    # a natural-debate tie is named and resolved by agent order (Du et al.)
    fake = FakeDebater([], by_temperature={0.2: "7", 1.0: "8"})
    out = E.debate_batch(fake, "natural", problems, [0.2, 1.0], 1, 8, "m", None, 10, cfg)[0]
    assert out["tie"] and out["final_answer"] == "7" and len(fake.calls) == 2  # two temperatures: two calls


def test_arithmetic_pools_are_disjoint_and_exact():
    from workflows.debate import evaluate as E
    from workflows.debate.config import EvalDataConfig

    assert E.evaluate_expression("3+4*5-2*6") == 11 and E.evaluate_expression("7") == 7
    with pytest.raises(ValueError, match="not an expression"):
        E.evaluate_expression("__import__('os')")
    data = EvalDataConfig(split="test", gsm8k_limit=0, arithmetic_count=300, arithmetic_max=10,
                          arithmetic_form="three", dev_count=200)
    final = E.eval_problems(data)
    dev = E.eval_problems(data.model_copy(update={"split": "dev"}))
    assert len(final) == 300 and len(dev) == 200
    fe, de = {p["expression"] for p in final}, {p["expression"] for p in dev}
    assert len(fe) == 300 and len(de) == 200 and not fe & de  # distinct, and never a dev item
    assert all(int(p["gold"]) == int(a) + int(b) * int(c) for p in final
               for a, b, c in [re.fullmatch(r"(\d)\+(\d)\*(\d)", p["expression"]).groups()])
    assert final[0]["question"] == f"What is the result of {final[0]['expression']}?"
    with pytest.raises(ValueError, match="only"):
        E.arithmetic_problems(1001, 0, 10, "{}+{}*{}")


def test_paired_tests_mcnemar_and_bootstrap():
    from workflows.debate import evaluate as E

    # 10 items: cipher right on 6, natural on 3; cipher only on 4, natural only on 1
    c = [1, 1, 1, 1, 1, 1, 0, 0, 0, 0]
    n = [0, 0, 0, 0, 1, 1, 1, 0, 0, 0]
    recs = [{"qid": f"q{i}", "dataset": "arithmetic", "mode": m, "correct": bool(x)}
            for m, xs in (("cipher", c), ("natural", n)) for i, x in enumerate(xs)]
    rows = {(r["dataset"], r["a"], r["b"]): r for r in E.paired_tests(recs, 2000)}
    r = rows[("all", "cipher", "natural")]
    assert (r["n"], r["only_a"], r["only_b"], r["both"], r["neither"]) == (10, 4, 1, 2, 3)
    assert abs(r["mcnemar_p"] - 0.375) < 1e-9  # 2 * P(X <= 1), X ~ Bin(5, 1/2) = 2 * 6/32
    assert abs(r["diff"] - 0.3) < 1e-12 and r["bootstrap_low"] < 0.3 < r["bootstrap_high"]
    assert E.mcnemar_exact(0, 0) == 1.0
    assert "| all | cipher vs natural | 10 |" in E.paired_table(list(rows.values()))


def test_eval_resumes_from_parts_and_refuses_another_config(tmp_path):
    """finish() gathers finished batches; a rerun plan with another configuration is refused."""
    from embedforge import storage
    from embedforge.errors import ConfigError
    from workflows.debate import evaluate as E
    from workflows.debate.config import DebateEvalConfig

    cfg = DebateEvalConfig.model_validate({"data": {"gsm8k_limit": 0, "arithmetic_count": 4, "dev_count": 4,
                                                    "arithmetic_form": "three", "arithmetic_max": 10},
                                           "batch_size": 2, "output": str(tmp_path / "ev")})
    problems = E.eval_problems(cfg.data)
    plan = E._plan(cfg, problems)
    parts = storage.join(cfg.output, "parts")
    E._check_plan(parts, plan)
    E._check_plan(parts, plan)  # the same plan again: fine
    other = cfg.model_copy(update={"max_tokens": 7})
    with pytest.raises(ConfigError, match="differs in: max_tokens"):
        E._check_plan(parts, E._plan(other, problems))
    batches = [problems[:2], problems[2:]]
    part_uri = lambda mode, b: storage.join(parts, f"{mode}-{b:04d}.json")  # noqa: E731

    def write(mode, b, correct, wall):
        recs = [{**p, "mode": mode, "batch": b, "final_answer": "1", "correct": correct, "tie": False,
                 "completion_tokens": 3, "prompt_tokens": 9, "seconds": wall / 2, "transcript": "[]"}
                for p in batches[b]]
        storage.write_json(part_uri(mode, b), {"mode": mode, "batch": b, "wall_s": wall, "records": recs})

    write("cipher", 0, True, 6.0)
    write("natural", 0, False, 2.0)
    partial = E.finish(cfg, problems, plan, batches, part_uri)
    assert not partial["complete"] and partial["manifest"] is None and "Incomplete: 2/6" in partial["report"]
    for b in (0, 1):
        write("single", b, b == 0, 1.0)
    write("cipher", 1, False, 6.0)
    write("natural", 1, True, 3.0)
    done = E.finish(cfg, problems, plan, batches, part_uri)
    assert done["complete"] and storage.read_manifest(cfg.output)["rows"] == 12
    assert done["wall_time"]["ratio"] == pytest.approx(12.0 / 5.0) and done["wall_time"]["questions"] == 4
    by = {(r["dataset"], r["mode"]): r for r in done["table"]}
    assert by[("all", "cipher")]["accuracy"] == 0.5 and by[("all", "single")]["n"] == 4
    assert {(t["a"], t["b"]) for t in done["paired_tests"]} == {("cipher", "natural"), ("cipher", "single"),
                                                                 ("natural", "single")}
    assert (Path(cfg.output) / "accuracy.png").read_bytes()[:4] == b"\x89PNG"


def test_agents_honor_num_gpus():
    """agent_deployment.num_gpus reaches both agent kinds' replicas; a CIPHER agent asked for a GPU
    without CUDA says so instead of silently decoding on CPU."""
    from ray.serve.deployment import Application

    from actors.cipher_agent import CipherAgent, CipherAgentConfig
    from embedforge.errors import EngineError
    from workflows.debate.app import build_debate_app
    from workflows.debate.config import DebateConfig

    config = DebateConfig.model_validate({"agent_deployment": {"num_cpus": 2, "num_gpus": 1},
                                          "auth": {"mode": "disabled"}})
    app = build_debate_app(config)
    assert isinstance(app, Application)
    handles = app._bound_deployment.init_args[1]
    options = {name: h._bound_deployment.ray_actor_options for name, h in handles.items()}
    assert options == {"cipher-smollm2-135m-instruct": {"num_cpus": 2, "num_gpus": 1},
                       "text-smollm2-135m-instruct": {"num_cpus": 2, "num_gpus": 1}}
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(EngineError, match="num_gpus=1.0 but torch sees no CUDA"):
            CipherAgent(CipherAgentConfig(num_gpus=1))


def test_gsm8k_problems_have_numeric_gold():
    from workflows.debate.evaluate import gsm8k_problems

    probs = gsm8k_problems(3)
    assert len(probs) == 3 and all(P.normalize_number(p["gold"]) is not None for p in probs)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_debate_eval_job_end_to_end(ray_local, smollm_path, tmp_path):
    from embedforge import storage
    from jobs.debate_eval import main

    out = tmp_path / "eval"
    rc = main(["--config", str(REPO / "configs" / "debate_eval.yaml"), "--set", f"model={smollm_path}",
               "--set", "data.gsm8k_limit=2", "--set", "data.arithmetic_count=2", "--set", "rounds=2",
               "--set", "max_tokens=12", "--set", f"output={out}", "--set", "engine.max_model_len=2048"])
    assert rc == 0
    manifest = storage.read_manifest(str(out))
    assert manifest["rows"] == 12
    summary = json.loads((out / "summary.json").read_text())
    assert {r["mode"] for r in summary["table"]} == {"cipher", "natural", "single"}
    assert summary["cipher_over_natural_wall_time"] > 0
    assert (out / "accuracy.png").exists() and "| gsm8k | cipher |" in (out / "report.md").read_text()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_gemma_tokenizer_mismatch_with_smollm(smollm_path):
    from transformers import AutoTokenizer

    from embedforge.models import resolve_model
    from embedforge.cipher import TokenizerMismatchError, check_same_tokenizer

    gemma = resolve_model("gemma-3-270m")
    with pytest.raises(TokenizerMismatchError, match="must share a tokenizer"):
        check_same_tokenizer(AutoTokenizer.from_pretrained(smollm_path), AutoTokenizer.from_pretrained(gemma),
                             "smollm2", "gemma")

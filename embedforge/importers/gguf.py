"""Convert a GGUF checkpoint into a safetensors folder that transformers and vLLM load.

transformers dequantizes GGUF on load (``from_pretrained(folder, gguf_file=...)``, needs the
``gguf`` package); ``save_pretrained`` refuses a model loaded that way until the GGUF quantizer
and the config's ``quantization_config`` are removed. The weights are then saved in bfloat16
(what vLLM runs on CPU), with the tokenizer, the chat template stored in the GGUF metadata
(``tokenizer.chat_template``) when the converted tokenizer lacks it, and a generation config
whose special ids agree with the tokenizer.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from embedforge.errors import InputError

log = logging.getLogger(__name__)


def concat_parts(parts: list[Path], dest: Path) -> Path:
    """Concatenate split GGUF chunks, in the given order, into ``dest``."""
    with open(dest, "wb") as out:
        for p in parts:
            with open(p, "rb") as f:
                shutil.copyfileobj(f, out, 16 << 20)
    with open(dest, "rb") as f:
        if f.read(4) != b"GGUF":
            raise InputError(f"{dest}: chunks {[str(p) for p in parts]} do not start with the GGUF magic")
    return dest


def gguf_metadata_string(path: Path, key: str) -> str | None:
    """A string field of the GGUF header (e.g. ``tokenizer.chat_template``), or None."""
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields.get(key)
    if field is None:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def gguf_metadata_bool(path: Path, key: str) -> bool | None:
    """A boolean field of the GGUF header (e.g. ``tokenizer.ggml.add_bos_token``), or None."""
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields.get(key)
    if field is None:
        return None
    return bool(field.parts[field.data[0]][0])


def import_gguf(gguf_file: str | Path, dest: str | Path, dtype: str = "bfloat16") -> Path:
    """Write a transformers folder (safetensors, tokenizer, configs) for ``gguf_file`` into ``dest``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    gguf_file = Path(gguf_file)
    if not gguf_file.is_file():
        raise InputError(f"{gguf_file}: GGUF file not found")
    folder, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # The GGUF header says whether prompts start with BOS (Gemma: yes). transformers' GGUF
    # tokenizer conversion drops that flag; without BOS Gemma's outputs degrade badly.
    add_bos = gguf_metadata_bool(gguf_file, "tokenizer.ggml.add_bos_token")
    if add_bos is not None and add_bos != bool(tokenizer("x").input_ids[:1] == [tokenizer.bos_token_id]):
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, add_bos_token=add_bos)
    if not getattr(tokenizer, "chat_template", None):
        template = gguf_metadata_string(gguf_file, "tokenizer.chat_template")
        if template:
            tokenizer.chat_template = template
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model = model.to(getattr(torch, dtype))
    model.config.dtype = dtype
    model.generation_config = _generation_config(model.config, tokenizer, GenerationConfig)

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    (dest / "gguf_import.json").write_text(json.dumps({"source": str(gguf_file), "dtype": dtype}))
    log.info("imported %s -> %s", gguf_file, dest)
    return dest


def _generation_config(config, tokenizer, generation_config_cls):
    """Special ids from the tokenizer (the source of truth the chat template relies on)."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else config.eos_token_id
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else config.bos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    config.eos_token_id, config.bos_token_id, config.pad_token_id = eos, bos, pad
    return generation_config_cls(bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)

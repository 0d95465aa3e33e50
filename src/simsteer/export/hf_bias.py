"""The ``hf-bias`` export: an additive policy baked into a model's MLP output biases.

A constant vector ``v`` added to the output of decoder layer ``L`` at every position is
the same, in a pre-norm decoder whose layer ends in ``h = residual + mlp(norm(residual))``,
as ``v`` added to the bias of that layer's MLP output projection (``mlp.down_proj``). The
exported folder is a complete transformers model (config with ``mlp_bias: true``,
safetensors weights, tokenizer, chat template, generation config), so stock engines run
the steered model at full speed with no steering code. ``mlp_bias`` also gives the gate
and up projections a bias: those, and the down projections of unsteered layers, get zero
biases when the model had none; a bias the model already had is kept and the vector is
added to it.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..architecture import find_layers, walk
from ..errors import SimsError
from ..io import is_temporary, new_file_mode, read_json, staged_dir, write_json
from ..models import LoadedModel
from ..policy import Policy

__all__ = [
    "MANIFEST_NAME",
    "SUPPORTED_MODEL_TYPES",
    "biased_model",
    "check_folder_target",
    "check_model_type",
    "read_manifest",
    "write_hf_bias",
]

#: Model types whose decoder layer ends in ``residual + mlp(...)`` (no scale, no norm after
#: the MLP) and whose transformers config reads ``mlp_bias``: checked in transformers'
#: modeling code for each (Llama and SmolLM2 are ``llama``).
SUPPORTED_MODEL_TYPES = ("llama", "smollm3", "helium", "arcee", "seed_oss", "nemotron", "jais2")
#: What the export records about itself, next to ``config.json``.
MANIFEST_NAME = "simsteer_export.json"
#: Where the vector of layer ``L`` goes, inside decoder layer ``L``.
BIAS_SITE = "mlp.down_proj"


def write_hf_bias(policy: Policy, lm: LoadedModel, out: str | Path, *, force: bool = False) -> Path:
    """Write ``lm`` with ``policy`` baked into its MLP biases as the model folder ``out``.

    The folder is written as a hidden sibling and renamed into place (crash-safe); the
    weights keep ``lm``'s dtype (fp32 for an fp32 load, so the dequantised weights of a
    GGUF model are written as they are).

    Args:
        policy: an additive policy (:meth:`Policy.additive_vectors`), learned on ``lm``.
        lm: the loaded model the policy steers.
        out: the model folder to write.
        force: replace a folder a previous export wrote at ``out``.

    Returns:
        ``out``.

    Example:
        >>> write_hf_bias(Policy.load("runs/sims/final"), load_model(dtype="fp32"), Path("steered"))
        >>> AutoModelForCausalLM.from_pretrained("steered")  # no simsteer needed
    """
    out = Path(out)
    vectors = policy.additive_vectors()
    if not vectors:
        raise SimsError("the policy is the unsteered model: there is no steering to export")
    policy.check_model(lm.model)
    check_folder_target(out, force)
    model = biased_model(lm.model, vectors)
    with staged_dir(out) as tmp:
        model.save_pretrained(tmp)
        lm.tokenizer.save_pretrained(tmp)
        write_json(tmp / MANIFEST_NAME, _manifest(policy, lm, vectors))
        _finish_files(tmp)  # staged_dir fsyncs the folders; transformers wrote the files
    return out


def check_model_type(model: nn.Module) -> str:
    """``model``'s config ``model_type`` if the export supports it; else one line naming
    the supported ones."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise SimsError(
            f"hf-bias supports the model types {', '.join(SUPPORTED_MODEL_TYPES)}, not {model_type!r} "
            "(their config reads mlp_bias and their layers end in residual + MLP output)"
        )
    if not type(model).__module__.startswith("transformers."):
        raise SimsError(
            f"{type(model).__name__} is not a transformers class (remote code); an hf-bias "
            "export must load in stock transformers"
        )
    return model_type


def biased_model(model: nn.Module, vectors: dict[int, torch.Tensor]) -> nn.Module:
    """A model of ``model``'s class with ``mlp_bias`` on, sharing its weights, whose
    ``layers[L].mlp.down_proj`` bias is the old bias (or zero) plus ``vectors[L]``.

    The copy is built on the meta device and its parameters are assigned from
    ``model``'s tensors, so no weight is copied; only the biases are new tensors and
    ``model`` is never changed.

    Args:
        model: a transformers causal LM of a supported type.
        vectors: layer index -> float32 vector of the hidden size.
    """
    check_model_type(model)
    layers = find_layers(model)
    bad = [i for i in vectors if not 0 <= i < len(layers)]
    if bad:
        raise SimsError(f"the policy steers layer {bad[0]}, but the model has layers 0-{len(layers) - 1}")
    config = copy.deepcopy(model.config)
    config.mlp_bias = True
    with torch.device("meta"):
        target = type(model)(config)
    names = {id(m): name for name, m in target.named_modules()}
    target_layers = find_layers(target)
    bias_keys = {}
    for index in vectors:
        proj = walk(target_layers[index], BIAS_SITE)
        if not isinstance(proj, nn.Linear) or proj.bias is None:
            raise SimsError(f"layer {index} of {type(model).__name__} has no {BIAS_SITE} with a bias")
        bias_keys[index] = f"{names[id(proj)]}.bias"
    source = model.state_dict()
    wanted = target.state_dict()
    extra = sorted(set(source) - set(wanted))
    added = sorted(set(wanted) - set(source))
    unexpected = [k for k in added if not (k.endswith(".bias") and ".mlp." in k)]
    if extra or unexpected:
        raise SimsError(
            f"{type(model).__name__} with mlp_bias has other parameters than expected "
            f"({(extra + unexpected)[0]}); this architecture cannot be exported as hf-bias"
        )
    weights: dict[str, torch.Tensor] = dict(source)
    for key in added:
        like = source[key.removesuffix(".bias") + ".weight"]
        weights[key] = torch.zeros(wanted[key].shape, dtype=like.dtype, device=like.device)
    for index, vector in vectors.items():
        key = bias_keys[index]
        old = weights[key]
        if vector.shape != old.shape:
            raise SimsError(
                f"the vector of layer {index} has shape {tuple(vector.shape)}, not {tuple(old.shape)}"
            )
        # Summed in fp32, then stored in the model's dtype; a new tensor: model's stays as is.
        weights[key] = (old.float() + vector.to(old.device).float()).to(old.dtype)
    target.load_state_dict(weights, strict=True, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        target.tie_weights()
    target.generation_config = copy.deepcopy(model.generation_config)
    return target.eval()


def check_folder_target(out: Path, force: bool) -> None:
    """Refuse an ``out`` that is a file, or a non-empty folder unless ``force`` and it
    holds a previous export (a mistyped path never deletes a folder of other files)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise SimsError(f"{out} is a file; hf-bias writes a model folder")
    entries = [p for p in out.iterdir() if not is_temporary(p.name)]
    if not entries:
        return
    if not force:
        raise SimsError(f"{out} exists and is not empty; pass --force to replace a previous export")
    if not (out / MANIFEST_NAME).is_file():
        raise SimsError(
            f"{out} is not a previous export (no {MANIFEST_NAME}); not replacing it, even with --force"
        )


def _manifest(policy: Policy, lm: LoadedModel, vectors: dict[int, torch.Tensor]) -> dict[str, Any]:
    from .._version import __version__

    return {
        "format": "hf-bias",
        "simsteer_version": __version__,
        "source_model": lm.source,
        "fingerprint": lm.fingerprint(),
        "dtype": str(lm.dtype).replace("torch.", ""),
        "site": f"output of decoder layer L (residual stream), added to layers[L].{BIAS_SITE}.bias",
        "layers": sorted(vectors),
        "vector_norms": {str(i): round(float(v.norm()), 6) for i, v in vectors.items()},
        "steerings": [
            {
                "learner": s.learner,
                "layers": s.layers,
                "strength": s.strength,
                "positions": s.positions,
                "hyperparameters": s.hyperparameters,
            }
            for s in policy
            if s.functions
        ],
    }


def _finish_files(root: Path) -> None:
    """fsync every file under ``root`` and give it the usual mode (transformers writes
    the weights through a private temporary file: 0600, unreadable to a server's user)."""
    mode = new_file_mode()
    for folder, _, files in os.walk(root):
        for name in files:
            path = Path(folder) / name
            os.chmod(path, mode)
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The :data:`MANIFEST_NAME` record of an exported folder."""
    return read_json(Path(folder) / MANIFEST_NAME)

"""Exports of an additive policy to formats that stock engines run without simsteer.

Two formats hold a policy whose every function is a constant vector added to a layer's
output at every position (CAA, PCA, ActAdd with ``mode="mean"``, and stacks of them):

- ``gguf-cvec``: a llama.cpp control-vector GGUF file (``llama-cli --control-vector``);
- ``hf-bias``: a transformers model folder with the vectors baked into the MLP output
  biases (:mod:`simsteer.export.hf_bias`).

Any other policy (HPR, SEA, ITI, a steering restricted to some positions) is refused in
one line; its steering folder holds it (``sims generate --steering``, ``sims serve``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import SimsError
from ..models import LoadedModel
from ..policy import Policy
from .gguf_cvec import load_gguf_cvec

__all__ = [
    "FORMATS",
    "check_exportable",
    "check_format",
    "check_target",
    "export_policy",
    "load_gguf_cvec",
    "output_size",
]

#: The export formats, as ``sims export --format`` names them.
FORMATS = ("gguf-cvec", "hf-bias")


def check_format(fmt: str) -> str:
    """``fmt`` if it is one of :data:`FORMATS`; else one line listing them."""
    if fmt not in FORMATS:
        raise SimsError(f"unknown export format {fmt!r}: use one of {', '.join(FORMATS)}")
    return fmt


def check_exportable(policy: Policy, fmt: str) -> dict[int, torch.Tensor]:
    """The policy's per-layer vectors if ``fmt`` can hold it; else one line saying why.

    Needs no model, so a command checks this before any slow load.

    Args:
        policy: the policy to export.
        fmt: one of :data:`FORMATS`.
    """
    check_format(fmt)
    try:
        vectors = policy.additive_vectors()
    except SimsError as exc:
        raise SimsError(
            f"{fmt} cannot hold this policy: {exc}; a steering folder holds any policy "
            "(sims generate --steering, sims serve)"
        ) from None
    if not vectors:
        raise SimsError("the policy is the unsteered model (the run kept no steering): nothing to export")
    return vectors


def check_target(out: str | Path, fmt: str, force: bool = False) -> Path:
    """Refuse an output path ``fmt`` must not write to, in one line; returns it as a Path.

    ``hf-bias`` writes a folder (a non-empty one is replaced only with ``force`` and only
    when a previous export wrote it); ``gguf-cvec`` writes a file (an existing one is
    replaced only with ``force``).

    Args:
        out: the output path.
        fmt: one of :data:`FORMATS`.
        force: allow replacing a previous export.
    """
    out = Path(out)
    if check_format(fmt) == "hf-bias":
        from .hf_bias import check_folder_target

        check_folder_target(out, force)
    elif out.is_dir():
        raise SimsError(f"{out} is a folder; {fmt} writes one file")
    elif out.exists() and not force:
        raise SimsError(f"{out} exists; pass --force to replace it")
    return out


def export_policy(policy: Policy, lm: LoadedModel, fmt: str, out: str | Path, *, force: bool = False) -> Path:
    """Write ``policy`` (learned on ``lm``) to ``out`` in the format ``fmt``.

    Args:
        policy: an additive policy (see :func:`check_exportable`).
        lm: the model the policy was learned on.
        fmt: one of :data:`FORMATS`.
        out: the file (``gguf-cvec``) or folder (``hf-bias``) to write.
        force: replace a previous export at ``out``.

    Returns:
        the path written.

    Example:
        >>> export_policy(Policy.load("runs/sims/final"), load_model(dtype="fp32"), "hf-bias", "steered")
    """
    check_exportable(policy, fmt)
    out = check_target(out, fmt, force)
    policy.check_model(lm.model)
    if fmt == "hf-bias":
        from .hf_bias import write_hf_bias

        return write_hf_bias(policy, lm, out, force=force)
    try:
        from .gguf_cvec import write_gguf_cvec
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.gguf_cvec":
            raise
        raise SimsError("the gguf-cvec export is not part of this build of simsteer") from None
    return write_gguf_cvec(policy, lm, out)


def output_size(path: str | Path) -> int:
    """Bytes of the file ``path``, or of every file under the folder ``path``."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())

"""``sims export``: write a run's final policy (or a steering folder) in a format that
stock engines run without simsteer (:mod:`simsteer.export`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import SimsError
from ..export import FORMATS
from .options import model_source, strength

if TYPE_CHECKING:
    from ..policy import Policy


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``sims export``."""
    p = sub.add_parser(
        "export",
        help="export an additive steering for llama.cpp (gguf-cvec) or as a transformers model (hf-bias)",
    )
    p.add_argument("path", help="run directory (its final policy) or steering folder")
    p.add_argument(
        "--format",
        required=True,
        choices=FORMATS,
        help="gguf-cvec: a llama.cpp control vector file; hf-bias: a model folder with the "
        "vectors in its MLP biases",
    )
    p.add_argument("-o", "--output", required=True, help="file (gguf-cvec) or folder (hf-bias) to write")
    p.add_argument("--force", action="store_true", help="replace a previous export at --output")
    p.add_argument(
        "--strength", type=strength, default=None, help="multiplier on the saved strength (-10 to 10)"
    )
    group = p.add_argument_group("model (the one the steering was learned on)")
    group.add_argument(
        "--model",
        default=None,
        help="Hugging Face id, local folder or .gguf file (default: a run's own model; "
        "for a steering folder the embedded SmolLM2-135M-Instruct)",
    )
    group.add_argument(
        "--dtype", default="fp32", help="dtype of the exported weights: fp32 (default), bf16 or fp16"
    )
    group.add_argument("--device", default="cpu", help="where the model is loaded (default cpu)")
    group.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="let transformers run code shipped with the model (typed again for a run that used it)",
    )
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    """Check everything that needs no model, load the model, write the export."""
    from ..export import check_exportable, check_target, export_policy, output_size
    from ..models import load_model

    policy, source, remote = _resolve(Path(args.path), args)
    if args.strength is not None:
        policy = policy.scaled(args.strength)
    check_exportable(policy, args.format)  # before the slow model load
    out = check_target(args.output, args.format, args.force)
    lm = load_model(model_source(source), device=args.device, dtype=args.dtype, trust_remote_code=remote)
    written = export_policy(policy, lm, args.format, out, force=args.force)
    kind = "folder" if written.is_dir() else "file"
    print(
        f"wrote {args.format} {kind} {written} ({_size(output_size(written))}; "
        f"layers {', '.join(map(str, sorted(policy.additive_vectors())))} of {lm.source})",
        file=sys.stderr,
    )
    return 0


def _resolve(path: Path, args: argparse.Namespace) -> tuple[Policy, str | None, bool]:
    """(policy, model source, trust_remote_code) of a run directory or a steering folder."""
    from ..loop.rundir import RunDir
    from ..policy import load_policy
    from ..steering import CONFIG_NAME
    from .trust import check_model_config, check_paths

    run = RunDir(path)
    if run.is_run():
        spec = run.spec()
        if not run.has_final():
            raise SimsError(f"{path} has no final policy yet (finish it with: sims run --resume {path})")
        if spec.model.trust_remote_code and not args.trust_remote_code:
            raise SimsError(
                f"{path}: its model {spec.model.source} runs the code shipped with it; since a run "
                "directory may have been edited by someone else, add --trust-remote-code to allow it"
            )
        if args.model is not None:
            return load_policy(run.final), args.model, bool(args.trust_remote_code)
        # The run's own model: the same checks as --resume, before the load.
        check_paths(spec, run.config)
        check_model_config(run.root, spec)
        return load_policy(run.final), spec.model.source, bool(args.trust_remote_code)
    if not path.exists():
        raise SimsError(f"{path} does not exist (name a run directory or a steering folder)")
    if not ((path / CONFIG_NAME).is_file() or (path / "step_1" / CONFIG_NAME).is_file()):
        raise SimsError(f"{path} is neither a run directory nor a steering folder")
    return load_policy(path), args.model, bool(args.trust_remote_code)


def _size(n: int) -> str:
    """``n`` bytes for people: ``812 B``, ``3.4 KB``, ``538.1 MB``, ``2.1 GB``."""
    if n < 1000:
        return f"{n} B"
    value, units = n / 1000, ["KB", "MB", "GB"]
    while value >= 1000 and len(units) > 1:
        value, units = value / 1000, units[1:]
    return f"{value:.1f} {units[0]}"

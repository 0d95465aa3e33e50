"""What ``sims run --resume`` (and ``sims eval``, ``sims baseline``) check before they use
anything a run directory names.

``config.json`` is only as trustworthy as the folder it sits in, which anyone with write
access may have edited. So code the run names (a ``python:`` oracle, ``trust_remote_code``)
and a credential it sends (a judge's API key variable) are used only when the same flag is
typed on the resume command line (:func:`check_trust`), or on the ``sims eval RUN`` /
``sims baseline KIND --like RUN`` command line (:func:`check_consent`); a saved path is
absolute and never looked up again from the current folder (:func:`check_paths`); the model and oracle rebuilt
must match the saved ones (:func:`check_rebuilt`, first from the model's config, before its
weights load: :func:`predicted_fingerprint`).
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..errors import SimsError
from ..loop.spec import ModelSpec, RunSpec, consents

# -- trust: code and credentials a run directory names ------------------------------------
#: Why a resume asks for the flag again (config.json is only as trustworthy as its folder).
_WHY = "a run directory may have been edited by someone else"


def _needs_consent(spec: RunSpec) -> list[tuple[str, str, str]]:
    """(parser dest, flag to type, what it allows) for each thing the run would execute
    or send that only an explicit flag may allow (:func:`~simsteer.loop.spec.consents`)."""
    needs = consents(spec.oracle, spec.model)
    learner = str(spec.learner.get("name", ""))
    if learner.startswith("python:"):
        needs.append(("learner", f"--learner {learner}", f"its learner imports and runs {learner[7:]}"))
    return needs


def check_trust(args: argparse.Namespace, spec: RunSpec) -> None:
    """Refuse to resume a run that names code to run (or a key to send) unless the resume
    command line names it too; a typed value must also be equal (:func:`check_flags`).

    Args:
        args: the parsed ``sims run`` options; ``args.given`` names those typed.
        spec: the run's saved spec.
    """
    _refuse_unasked(args, _needs_consent(spec), args.resume, "resume")


def _refuse_unasked(
    args: argparse.Namespace, needs: list[tuple[str, str, str]], where: Any, command: str
) -> None:
    for dest, typed, what in needs:
        if dest not in args.given:
            raise SimsError(
                f"{where}: {what}; since {_WHY}, that happens only when you ask: "
                f"add {typed} to the {command} command"
            )


def _same_oracle(typed: str, saved: dict[str, Any]) -> bool:
    """Whether a typed ``--oracle`` names the saved oracle (its name, and for a judge the
    endpoint; a ``python:`` file is compared as its absolute path)."""
    from ..oracles import oracle_spec

    wanted = oracle_spec(typed)
    return all(wanted[k] == saved.get(k) for k in ("name", "model", "base_url") if k in wanted)


def check_consent(
    args: argparse.Namespace,
    oracle: dict[str, Any] | str,
    model: ModelSpec | dict[str, Any],
    where: Any,
    command: str,
) -> frozenset[str]:
    """:func:`check_trust` for a command that uses a folder's saved oracle and model without
    resuming it (``sims eval RUN``, ``sims baseline KIND --like RUN``): each consent the
    folder needs must be typed (``--oracle``, ``--trust-remote-code``,
    ``--judge-api-key-env``), and a typed ``--oracle`` or key variable must be the saved one.
    Nothing of the folder's is imported or loaded here.

    Args:
        args: the parsed options; ``args.given`` names those typed.
        oracle: the saved oracle spec the command builds.
        model: the saved model the command loads.
        where: the folder, for the messages.
        command: the command's name, for the messages (``eval``, ``baseline``).

    Returns:
        the consent flags given, for the library's ``trusted`` parameter.
    """
    saved = {"name": oracle} if isinstance(oracle, str) else dict(oracle)
    if "oracle" in args.given and not _same_oracle(args.oracle, saved):
        raise SimsError(
            f"--oracle is {args.oracle} here but {saved.get('name')} in {where}: "
            "type the folder's own oracle (it is named only to allow its code to run)"
        )
    key = saved.get("api_key_env") if saved.get("name") == "judge" else None
    if "judge_api_key_env" in args.given and args.judge_api_key_env != key:
        raise SimsError(
            f"--judge-api-key-env is {args.judge_api_key_env} here but {key or 'none'} in {where}: "
            "the key variable is the folder's judge's own; leave the flag out or type that one"
        )
    needs = consents(saved, model)
    _refuse_unasked(args, needs, where, command)
    return frozenset(typed for _, typed, _ in needs)


def add_consent_options(p: argparse.ArgumentParser, folder: str) -> None:
    """The flags that allow what a saved folder names to run code or send a key
    (:func:`check_consent`), for a command that reads a folder it did not start."""
    group = p.add_argument_group(
        f"consent: typed again for what {folder} names (its config.json may have been edited)"
    )
    group.add_argument(
        "--oracle",
        default=None,
        metavar="python:TARGET",
        help=f"allow the python: oracle {folder} names to be imported and run (type the same one)",
    )
    group.add_argument(
        "--trust-remote-code",
        action="store_true",
        help=f"allow the model {folder} names to run the code shipped with it",
    )
    group.add_argument(
        "--judge-api-key-env",
        default=None,
        metavar="VAR",
        help=f"allow the judge {folder} names to send the key in $VAR (type the same VAR)",
    )


# -- saved paths ----------------------------------------------------------------------------
def _local_looking(ref: str) -> bool:
    """Whether a model reference that is not absolute would be read as a local path here
    (a hub id ``org/name`` is fine unless a folder of that name is in the current folder)."""
    return ref.startswith((".", "~")) or ref.endswith(".gguf") or ref.count("/") > 1 or Path(ref).exists()


def saved_paths(spec: RunSpec) -> list[tuple[str, str, bool]]:
    """(field, value, may be a hub id) for every path a run's spec names that a resume reads.

    Args:
        spec: the run's saved spec.
    """
    from ..models import EMBEDDED_MODEL
    from ..oracles.templates import BUILTIN

    out = []
    if spec.model.source != EMBEDDED_MODEL:
        out.append(("model.source", spec.model.source, not spec.model.source.endswith(".gguf")))
    kind, _, arg = str(spec.oracle.get("name", "")).partition(":")
    if kind in ("reward-model", "rm") and arg:
        out.append(("oracle.name", arg, True))
    if kind == "python":
        module, sep, _ = arg.rpartition(":")
        if sep and (module.endswith(".py") or "/" in module):  # a file, not an importable module
            out.append(("oracle.name", module, False))
    template = spec.oracle.get("template")
    if isinstance(template, str) and template not in BUILTIN:
        out.append(("oracle.template", template, False))
    cache = spec.oracle.get("cache")
    if isinstance(cache, str):
        out.append(("oracle.cache", cache, False))
    return out


def check_paths(spec: RunSpec, source: Path) -> None:
    """Refuse a saved path that is not absolute: a resume never looks it up again from the
    current folder, where the same relative name may be another file.

    Args:
        spec: the run's saved spec.
        source: its ``config.json``, for the message.
    """
    for name, value, hub in saved_paths(spec):
        if Path(value).is_absolute() or (hub and not _local_looking(value)):
            continue
        raise SimsError(
            f"{source}: {name} holds the relative path {value!r}; a resume never looks a saved path "
            "up from the current folder: write its absolute path there"
        )


# -- the rebuilt model and oracle against the saved ones -----------------------------------
def check_rebuilt(out: Path, spec: RunSpec, model: ModelSpec, oracle: dict[str, Any] | None = None) -> None:
    """Refuse a model (fingerprint, dtype) or oracle spec that differs from the saved run's
    in one line naming each difference (the loop would learn from something else).

    Args:
        out: the run directory.
        spec: its saved spec.
        model: the model as loaded now (or as its config predicts, before the load).
        oracle: the oracle's spec as built now (``None``: not built yet).
    """
    current = replace(spec, model=model, oracle=spec.oracle if oracle is None else oracle)
    diffs = spec.mismatches(current)
    if diffs:
        raise SimsError(
            f"{out} was started with another model or oracle than the one found now ({'; '.join(diffs)}): "
            "restore them, or start a new run"
        )


def predicted_fingerprint(source: str) -> dict[str, Any]:
    """The fingerprint a local model folder's config predicts, without loading weights;
    only the fields it can tell (empty for a hub id, a GGUF file or a custom config).

    Args:
        source: the saved ``model.source``.
    """
    folder = Path(source)
    if not (folder.is_absolute() and (folder / "config.json").is_file()):
        return {}
    from transformers import AutoConfig

    try:  # never trust_remote_code here: that consent is for the load itself
        cfg = AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception:  # a config transformers cannot read here: the load itself says why
        return {}
    archs = getattr(cfg, "architectures", None) or []
    guess = {
        "architecture": archs[0] if archs else None,
        "model_type": getattr(cfg, "model_type", None),
        "hidden_size": getattr(cfg, "hidden_size", None),
        "num_layers": getattr(cfg, "num_hidden_layers", None),
    }
    return {k: v for k, v in guess.items() if isinstance(v, str | int) and not isinstance(v, bool)}


def check_model_config(out: Path, spec: RunSpec) -> None:
    """:func:`check_rebuilt` on the fingerprint the model's config predicts (fields it
    cannot tell keep their saved value): a changed model is refused before its weights load.

    Args:
        out: the run directory.
        spec: its saved spec.
    """
    saved = spec.model.fingerprint
    predicted = {k: v for k, v in predicted_fingerprint(spec.model.source).items() if k in saved}
    check_rebuilt(out, spec, replace(spec.model, fingerprint={**saved, **predicted}))

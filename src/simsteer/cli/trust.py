"""What ``sims run --resume`` (and ``sims eval``, ``sims baseline``) check before they use
anything a run directory names.

``config.json`` is only as trustworthy as the folder it sits in, which anyone with write
access may have edited. So code the run names (a ``python:`` oracle, ``trust_remote_code``),
the endpoint a judge sends prompts and answers to and the API key variable it sends are used
only when the same flags, naming the same targets, are typed on the resume command line
(:func:`check_trust`), or on the ``sims eval RUN`` /
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

Consent = tuple[tuple[str, ...], str, str]


def _needs_consent(spec: RunSpec) -> list[Consent]:
    """(parser dests, flags to type, what it allows) for each thing the run would execute
    or send that only an explicit flag may allow (:func:`~simsteer.loop.spec.consents`)."""
    needs = consents(spec.oracle, spec.model)
    learner = str(spec.learner.get("name", ""))
    if learner.startswith("python:"):
        needs.append((("learner",), f"--learner {learner}", f"its learner imports and runs {learner[7:]}"))
    return needs


def check_trust(args: argparse.Namespace, spec: RunSpec) -> None:
    """Refuse to resume a run that names code to run, an endpoint to send to or a key to
    send, unless the resume command line names it too: the flags typed are compared with
    the saved values (:func:`~simsteer.cli.resume.check_flags`), so a consent is bound to
    its target (a changed URL or model source is refused there, in one line).

    Args:
        args: the parsed ``sims run`` options; ``args.given`` names those typed.
        spec: the run's saved spec.
    """
    _refuse_unasked(args, _needs_consent(spec), args.resume, "resume")


def _typed(args: argparse.Namespace, dest: str) -> bool:
    """Whether the option ``dest`` was typed; a judge's URL is also named by an
    ``--oracle judge:MODEL@URL`` (compared with the saved one like ``--judge-base-url``)."""
    if dest in args.given:
        return True
    if dest == "judge_base_url" and "oracle" in args.given and args.oracle:
        from ..oracles import oracle_spec

        return "base_url" in oracle_spec(args.oracle)
    return False


def _refuse_unasked(args: argparse.Namespace, needs: list[Consent], where: Any, command: str) -> None:
    for dests, typed, what in needs:
        if not all(_typed(args, dest) for dest in dests):
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


def _typed_differences(
    args: argparse.Namespace, saved: dict[str, Any], model: ModelSpec | dict[str, Any]
) -> list[tuple[str, str, str]]:
    """(flag, typed, saved) for each consent flag typed with another target than the saved
    one; values are shown redacted (a URL's credentials never reach a message)."""
    from ..oracles.llm_judge import redact_url
    from .options import model_source

    source = model.source if isinstance(model, ModelSpec) else model.get("source")
    judge = saved.get("name") == "judge"
    # A command with other judges of its own (sims eval --judge) types judge flags for
    # those too: they are compared only when the folder's oracle is a judge.
    typed = {"model": ("--model", source)}
    if judge:
        typed["judge_api_key_env"] = ("--judge-api-key-env", saved.get("api_key_env"))
        typed["judge_url_env"] = ("--judge-url-env", saved.get("base_url_env"))
    out = []
    for dest, (name, value) in typed.items():
        given = getattr(args, dest, None)
        if dest == "model":
            given = model_source(given)
        if dest in args.given and given != value:
            out.append((name, str(given), str(value or "none")))
    if judge and "judge_base_url" in args.given and args.judge_base_url:
        given_url = redact_url(args.judge_base_url)
        if given_url != saved.get("base_url"):
            out.append(("--judge-base-url", given_url, str(saved.get("base_url"))))
    return out


def check_consent(
    args: argparse.Namespace,
    oracle: dict[str, Any] | str,
    model: ModelSpec | dict[str, Any],
    where: Any,
    command: str,
) -> frozenset[str]:
    """:func:`check_trust` for a command that uses a folder's saved oracle and model without
    resuming it (``sims eval RUN``, ``sims baseline KIND --like RUN``): each consent the
    folder needs must be typed (``--oracle``, ``--trust-remote-code --model SOURCE``,
    ``--judge-base-url URL`` or ``--judge-url-env VAR``, ``--judge-api-key-env VAR``), and
    each typed one must name the saved target. Nothing of the folder's is imported or loaded
    here, and nothing is sent.

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
        from ..oracles.llm_judge import redact_url

        raise SimsError(
            f"--oracle is {redact_url(args.oracle)} here but {saved.get('name')} in {where}: "
            "type the folder's own oracle (it is named only to allow its code to run)"
        )
    for name, given, value in _typed_differences(args, saved, model):
        raise SimsError(
            f"{name} is {given} here but {value} in {where}: a consent names the folder's own target; "
            "leave the flag out or type that one"
        )
    needs = consents(saved, model)
    _refuse_unasked(args, needs, where, command)
    return frozenset(typed for _, typed, _ in needs)


def add_consent_options(p: argparse.ArgumentParser, folder: str, judge: bool = True) -> None:
    """The flags that allow what a saved folder names to run code or send to an endpoint
    (:func:`check_consent`), for a command that reads a folder it did not start.

    Args:
        folder: how the help names the folder.
        judge: also add the judge's URL and key flags (left out by a command that has the
            whole judge option group, :func:`~simsteer.cli.options.add_judge_options`).
    """
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
        help=f"allow the model {folder} names to run the code shipped with it (with --model)",
    )
    group.add_argument(
        "--model",
        default=None,
        metavar="SOURCE",
        help=f"the model source {folder} names (typed with --trust-remote-code: the consent names it); "
        f"{folder}'s own model is used",
    )
    if not judge:
        return
    group.add_argument(
        "--judge-base-url",
        default=None,
        metavar="URL",
        help=f"allow the judge {folder} names to send prompts and answers to URL (type the saved one)",
    )
    group.add_argument(
        "--judge-url-env",
        default=None,
        metavar="VAR",
        help=f"allow the judge {folder} names to send to the URL in $VAR (type the saved VAR)",
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

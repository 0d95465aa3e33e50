"""Reports: ``eval.json`` + ``report.md`` + PNG plots for one run, and a comparison of
several runs (``sims compare``). Plots use matplotlib's Agg backend (no display)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..io import atomic_write_bytes, read_json, write_json

if TYPE_CHECKING:
    from .run_eval import EvalResult


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_png(fig: Any, path: Path) -> None:
    """Render ``fig`` in memory and commit it in one rename (a kill leaves the old plot)."""
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    atomic_write_bytes(path, buffer.getvalue())


def _fmt(x: Any, spec: str = ".3f") -> str:
    return "-" if x is None else f"{x:{spec}}"


def _ci(d: dict[str, float], spec: str = "+.3f") -> str:
    return f"{d['mean']:{spec}} [{d['ci_low']:{spec}}, {d['ci_high']:{spec}}]"


def _wr(d: dict[str, Any]) -> str:
    w = d["win_rate"]
    lc = d["lc_win_rate"]
    return (
        f"{100 * w['value']:.1f} [{100 * w['ci_low']:.1f}, {100 * w['ci_high']:.1f}] "
        f"(W/T/L {w['wins']}/{w['ties']}/{w['losses']}); LC {100 * lc['value']:.1f} "
        f"[{100 * lc['ci_low']:.1f}, {100 * lc['ci_high']:.1f}]"
    )


def plot_history(history: list[dict[str, Any]], path: Path) -> bool:
    """Per-iteration curves: oracle scores and held-out perplexity. False if no history."""
    if not history:
        return False
    plt = _plt()
    t = [r["iteration"] for r in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    for key in ("eval_score", "sample_score"):
        a.plot(t, [r.get(key) for r in history], marker="o", label=key)
    a.set_xlabel("iteration")
    a.set_ylabel("oracle score")
    a.legend()
    ppl = [(r.get("eval_fluency") or {}).get("perplexity") for r in history]
    b.plot(t, ppl, marker="o", color="tab:red")
    b.set_xlabel("iteration")
    b.set_ylabel("held-out perplexity (base model)")
    fig.tight_layout()
    _save_png(fig, path)
    plt.close(fig)
    return True


def plot_metrics(result: dict[str, Any], path: Path) -> None:
    """Base vs policy score per scorer with bootstrap intervals, and win rates."""
    plt = _plt()
    names = list(result["scores"])
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    xs = range(len(names))
    for offset, side, color in ((-0.2, "base", "tab:gray"), (0.2, "policy", "tab:blue")):
        means = [result["scores"][n][side]["mean"] for n in names]
        err = [
            [m - result["scores"][n][side]["ci_low"] for n, m in zip(names, means, strict=True)],
            [result["scores"][n][side]["ci_high"] - m for n, m in zip(names, means, strict=True)],
        ]
        a.bar([x + offset for x in xs], means, 0.4, yerr=err, label=side, color=color, capsize=3)
    a.set_xticks(list(xs), names, rotation=20)
    a.set_title("attribute scores (95% CI)")
    a.legend()
    judges = list(result["win_rates_vs_base"])
    vals = [100 * result["win_rates_vs_base"][j]["win_rate"]["value"] for j in judges]
    lo = [
        v - 100 * result["win_rates_vs_base"][j]["win_rate"]["ci_low"]
        for v, j in zip(vals, judges, strict=True)
    ]
    hi = [
        100 * result["win_rates_vs_base"][j]["win_rate"]["ci_high"] - v
        for v, j in zip(vals, judges, strict=True)
    ]
    b.bar(range(len(judges)), vals, yerr=[lo, hi], color="tab:green", capsize=3)
    b.axhline(50, color="k", lw=0.8, ls="--")
    b.set_xticks(range(len(judges)), judges, rotation=20)
    b.set_ylim(0, 100)
    b.set_title("win rate vs base answers (%)")
    fig.tight_layout()
    _save_png(fig, path)
    plt.close(fig)


def plot_mc(mc: dict[str, Any], path: Path) -> bool:
    if not mc:
        return False
    plt = _plt()
    tasks = list(mc)
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(tasks), 3.5))
    for offset, side, color in ((-0.2, "base", "tab:gray"), (0.2, "policy", "tab:blue")):
        vals = [mc[t].get(side, {}).get("acc") for t in tasks]
        ses = [mc[t].get(side, {}).get("acc_se") for t in tasks]
        xs = [i + offset for i, v in enumerate(vals) if v is not None]
        if xs:
            ax.bar(
                xs,
                [v for v in vals if v is not None],
                0.4,
                yerr=[s for s in ses if s is not None],
                label=side,
                color=color,
                capsize=3,
            )
    ax.set_xticks(range(len(tasks)), tasks, rotation=15)
    ax.set_ylabel("accuracy (± 1 s.e.)")
    ax.legend()
    fig.tight_layout()
    _save_png(fig, path)
    plt.close(fig)
    return True


def _cost_table(costs: dict[str, dict[str, Any]]) -> list[str]:
    lines = [
        "| stage | generated tokens | forward tokens | judge calls | seconds |",
        "|---|---:|---:|---:|---:|",
    ]
    for stage, c in costs.items():
        lines.append(
            f"| {stage} | {c['generated_tokens']} | {c['forward_tokens']} | {c['judge_calls']} "
            f"| {c['seconds']:.1f} |"
        )
    return lines


def write_report(record: EvalResult, folder: Path) -> Path:
    """Write ``eval.json``, ``report.md`` and the PNG plots into ``folder``."""
    result = record.to_json()
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "eval.json", result)
    has_history = plot_history(result["history"], folder / "eval_curves.png")
    plot_metrics(result, folder / "eval_metrics.png")
    has_mc = plot_mc(result["mc"], folder / "eval_mc.png")
    r = result
    lines = [
        f"# Evaluation of `{r['run']}` ({r['kind']})",
        "",
        f"Model `{r['model']}`, oracle `{r['oracle']}`, learner `{r['learner']}`, "
        f"{r['num_prompts']} held-out prompts, greedy, {r['max_new_tokens']} new tokens. "
        "Intervals: 95% percentile bootstrap over prompts.",
        "",
        "## Scores (base = unsteered model, same prompts)",
        "",
        "| scorer | base | policy | paired delta |",
        "|---|---|---|---|",
    ]
    for name, s in r["scores"].items():
        lines.append(f"| {name} | {_ci(s['base'])} | {_ci(s['policy'])} | {_ci(s['delta'])} |")
    fl_b, fl_p = r["fluency"]["base"], r["fluency"]["policy"]
    lines += ["", "| fluency (under the base model) | base | policy |", "|---|---:|---:|"]
    for key in fl_b:
        lines.append(f"| {key} | {_fmt(fl_b[key], '.3f')} | {_fmt(fl_p[key], '.3f')} |")
    lines += ["", "## Win rate vs the base model's answers (both orders, ties count half)", ""]
    for judge, w in r["win_rates_vs_base"].items():
        lines.append(f"- judge `{judge}`: {_wr(w)}")
    if r["alpaca_eval"]:
        a = r["alpaca_eval"]
        lines += ["", f"## AlpacaEval ({a['n']} instructions vs gpt4_1106_preview answers)", ""]
        lines.append(
            f"Mean characters: policy {a['mean_chars']['policy']:.0f}, "
            f"reference {a['mean_chars']['reference']:.0f}."
        )
        for judge, w in a.items():
            if isinstance(w, dict) and "win_rate" in w:
                lines.append(f"- judge `{judge}`: {_wr(w)}")
    if r["mc"]:
        lines += [
            "",
            "## Multiple choice (log-likelihood; ± 1 s.e.)",
            "",
            "| task | n | base acc | policy acc | delta (paired) | base acc_norm | policy acc_norm |",
            "|---|---:|---|---|---|---|---|",
        ]
        for task, m in r["mc"].items():
            b, p = m["base"], m.get("policy")
            pol = f"{p['acc']:.3f} ± {p['acc_se']:.3f}" if p else "(unsteered)"
            delta = f"{p['delta_acc']:+.3f} ± {p['delta_acc_se']:.3f}" if p else "-"
            pn = f"{p['acc_norm']:.3f}" if p else "-"
            lines.append(
                f"| {task} | {b['n']} | {b['acc']:.3f} ± {b['acc_se']:.3f} | {pol} | {delta} | "
                f"{b['acc_norm']:.3f} | {pn} |"
            )
            if "mc2" in b:
                lines.append(
                    f"| {task} (mc2) | {b['n']} | {b['mc2']:.3f} | {p['mc2']:.3f} |"
                    if p
                    else f"| {task} (mc2) | {b['n']} | {b['mc2']:.3f} | - |"
                )
    lines += ["", "## Costs of this evaluation", "", *_cost_table(r["costs"])]
    tc = r["training_costs"]
    if tc["seconds"]:
        lines += [
            "",
            f"Training ({'the loop' if has_history else 'one fit on the labelled pairs'}): "
            f"{tc['tokens_generated']} tokens generated, "
            f"{tc['tokens_forward']} forward tokens, {tc['seconds']:.0f} s.",
        ]
    lines += ["", "## Plots", ""]
    if has_history:
        lines.append("![per-iteration curves](eval_curves.png)")
    lines.append("![metrics](eval_metrics.png)")
    if has_mc:
        lines.append("![multiple choice](eval_mc.png)")
    lines += ["", "## Sample answers (base vs steered)", ""]
    for s in r["samples"]:
        lines += [f"**{s['prompt']}**", "", f"- base: {s['base']}", f"- steered: {s['policy']}", ""]
    path = folder / "report.md"
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
    return path


def compare_rows(results: Sequence[dict[str, Any]], judge: str | None = None) -> list[dict[str, Any]]:
    """One summary row per evaluated run (the numbers `sims compare` prints)."""
    rows = []
    for r in results:
        j = judge if judge and judge in r["win_rates_vs_base"] else next(iter(r["win_rates_vs_base"]), None)
        oracle_score = r["scores"].get(r["oracle"], {}).get("policy")
        row = {
            "run": Path(r["run"]).name,
            "kind": r["kind"],
            "oracle_score": oracle_score["mean"] if oracle_score else None,
            "oracle_ci": (oracle_score["ci_low"], oracle_score["ci_high"]) if oracle_score else None,
            "judge": j,
            "win_rate": r["win_rates_vs_base"][j]["win_rate"]["value"] if j else None,
            "win_ci": (
                r["win_rates_vs_base"][j]["win_rate"]["ci_low"],
                r["win_rates_vs_base"][j]["win_rate"]["ci_high"],
            )
            if j
            else None,
            "perplexity": r["fluency"]["policy"]["perplexity"],
            "distinct_2": r["fluency"]["policy"]["distinct_2"],
            "mean_tokens": r["fluency"]["policy"]["mean_tokens"],
            "train_seconds": r["training_costs"]["seconds"],
            "train_tokens": r["training_costs"]["tokens_generated"] + r["training_costs"]["tokens_forward"],
            "saved_bytes": r["training_costs"].get("saved_bytes"),  # absent from older eval.json
            "eval_seconds": r["costs"]["total"]["seconds"],
        }
        for task, m in r["mc"].items():
            side = m.get("policy", m["base"])
            row[task] = (side["acc"], side["acc_se"])
        rows.append(row)
    return rows


def _size(n: int | None) -> str:
    """Bytes as B / KB / MB (decimal), ``-`` when unknown."""
    if n is None:
        return "-"
    for unit, scale in (("MB", 10**6), ("KB", 10**3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def compare_table(rows: list[dict[str, Any]]) -> str:
    tasks = sorted(
        {k for r in rows for k in r if isinstance(r.get(k), tuple) and k not in ("oracle_ci", "win_ci")}
    )
    head = [
        "run",
        "kind",
        "oracle score [95% CI]",
        "win rate vs base, % [95% CI]",
        "ppl",
        "distinct-2",
        "tokens",
        *tasks,
        "train s",
        "train tokens",
        "saved",
        "eval s",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r["run"],
            r["kind"],
            f"{r['oracle_score']:+.3f} [{r['oracle_ci'][0]:+.3f}, {r['oracle_ci'][1]:+.3f}]"
            if r["oracle_ci"]
            else "-",
            f"{100 * r['win_rate']:.1f} [{100 * r['win_ci'][0]:.1f}, "
            f"{100 * r['win_ci'][1]:.1f}] ({r['judge']})"
            if r["win_ci"]
            else "-",
            "-" if r["perplexity"] is None else f"{r['perplexity']:.2f}",  # undefined: no tokens
            f"{r['distinct_2']:.3f}",
            f"{r['mean_tokens']:.1f}",
            *[f"{r[t][0]:.3f} ± {r[t][1]:.3f}" if t in r else "-" for t in tasks],
            f"{r['train_seconds']:.0f}",
            f"{r['train_tokens']}",
            _size(r["saved_bytes"]),
            f"{r['eval_seconds']:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _read_result(path: Path) -> dict[str, Any]:
    """``eval.json``, checked (:meth:`EvalResult.from_json`): one line naming a bad field."""
    from .run_eval import EvalResult

    return EvalResult.from_json(read_json(path), str(path)).to_json()


def compare_bars(
    rows: list[dict[str, Any]],
) -> list[tuple[str, list[float], list[list[float]] | None]]:
    """The three panels of ``compare.png``: (title, bar heights, error bars below/above).

    The win rate is a percentage, as in the table (:func:`compare_table`).
    """
    panels = []
    for key, ci, title, scale in (
        ("oracle_score", "oracle_ci", "oracle score (held-out)", 1.0),
        ("win_rate", "win_ci", "win rate vs base (%)", 100.0),
        ("perplexity", None, "perplexity (base model)", 1.0),
    ):
        vals = [scale * r[key] if r[key] is not None else 0.0 for r in rows]
        err = None
        if ci:
            err = [
                [max(v - (scale * r[ci][0] if r[ci] else v), 0) for v, r in zip(vals, rows, strict=True)],
                [max((scale * r[ci][1] if r[ci] else v) - v, 0) for v, r in zip(vals, rows, strict=True)],
            ]
        panels.append((title, vals, err))
    return panels


def write_comparison(runs: Sequence[str | Path], out: Path, judge: str | None = None) -> str:
    """Read each run's ``eval.json``; write ``compare.md`` and ``compare.png`` into ``out``."""
    from ..errors import SimsError

    results = []
    for run in runs:
        path = Path(run) / "eval.json"
        if not path.is_file():
            raise SimsError(f"{run} has no eval.json: run `sims eval {run}` first")
        results.append(_read_result(path))
    rows = compare_rows(results, judge)
    table = compare_table(rows)
    out.mkdir(parents=True, exist_ok=True)
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    names = [r["run"] for r in rows]
    for ax, (title, vals, err) in zip(axes, compare_bars(rows), strict=True):
        ax.bar(range(len(rows)), vals, yerr=err, capsize=3, color="tab:blue")
        ax.set_xticks(range(len(rows)), names, rotation=25, ha="right")
        ax.set_title(title)
    fig.tight_layout()
    _save_png(fig, out / "compare.png")
    plt.close(fig)
    atomic_write_bytes(out / "compare.md", (table + "\n\n![comparison](compare.png)\n").encode())
    write_json(out / "compare.json", rows)
    return table

"""Targets and diagnosis of results/grpo-keeps-peak: per run, the issue's three hold targets and how the logged
quantities move over the run, and the pictures.

    python results/grpo-keeps-peak/analyze.py            # from the repository root, after bench_grpo_hold.py

Reads each finished run's TensorBoard log under raw/<arm>/s<seed>/ (git-ignored) and keeps what it uses in
records/<arm>/s<seed>_diag.json (committed), so it re-reports from the records alone on a machine without raw/.
Writes targets.md, curves.png and diagnosis.png here.
"""

import json
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
TAGS = {
    "charts/normalized_score": "score",
    "charts/eval_length": "eval length",
    "charts/eval_return": "eval return",
    "charts/episodic_length": "train episode length",
    "charts/reset_step_mean": "reset step (mean)",
    "charts/learning_rate": "learning rate",
    "losses/group_reward_std": "group reward std",
    "losses/dropped_fraction": "dropped fraction",
    "losses/kl": "KL to pi_ref",
    "losses/clipfrac": "clip fraction",
    "losses/entropy": "entropy",
    "losses/kappa": "kappa",
    "losses/ratio_max": "ratio max",
}
ARMS = {"default": "gamma 0.995, Table 6's", "anneal": "--anneal-lr", "gamma1": "--gamma 1.0, now the CPU preset's"}


def series(arm: str, seed: int) -> dict[str, list]:
    """{tag: values at iterations 0.. (NaN where not logged)} of one run, from raw/ once, then from its record."""
    path = HERE / "records" / arm / f"s{seed}_diag.json"
    raw = HERE / "raw" / arm / f"s{seed}"
    if not path.exists() and (raw.parent / f"s{seed}.done").exists():
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        (run,) = [d for d in raw.iterdir() if d.is_dir()]
        acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
        acc.Reload()
        n = 1 + max(e.step for e in acc.Scalars("charts/normalized_score"))
        out = {}
        for tag in TAGS:
            values = np.full(n, np.nan)
            if tag in acc.Tags()["scalars"]:
                for e in acc.Scalars(tag):  # a resumed run re-logs from its state: the last write of a step wins
                    values[e.step] = e.value
            out[tag] = [None if np.isnan(v) else round(float(v), 6) for v in values]
        path.write_text(json.dumps(out) + "\n")
    if not path.exists():
        return {}
    return {k: np.array([np.nan if v is None else v for v in vs]) for k, vs in json.loads(path.read_text()).items()}


def targets(scores: np.ndarray) -> dict:
    """The issue's targets on iterations 1..n: T1 after the first evaluation at >= 90% of the peak none below 75% of
    it; T2 the std of the last 20 at most 6; T3 the mean of the last 10 at least 0.9 x the best 10-iteration mean."""
    s = scores[1:]
    peak = s.max()
    first = int(np.argmax(s >= 0.9 * peak))
    low = s[first:].min()
    best10 = np.convolve(s, np.ones(10) / 10, mode="valid").max()
    last20_std, last10 = s[-20:].std(), s[-10:].mean()
    return dict(
        start=scores[0], peak=peak, peak_at=int(np.argmax(s)) + 1, first90=first + 1, low_after=low,
        T1=low >= 0.75 * peak, last20_std=last20_std, T2=last20_std <= 6, last10=last10, best10=best10,
        T3=last10 >= 0.9 * best10, largest_drop=float(-np.diff(s).min()),
    )  # fmt: skip


def main():
    seeds = {arm: sorted(int(p.stem[1:]) for p in (HERE / "records" / arm).glob("s?.json")) for arm in ARMS}
    runs = {(arm, seed): series(arm, seed) for arm in ARMS for seed in seeds[arm]}
    runs = {k: v for k, v in runs.items() if v}
    lines = ["# grpo-keeps-peak: the issue's targets per run", ""]
    lines += ["T1: after the first evaluation at >= 90% of the peak, none below 75% of it. T2: std (ddof 0) of the last 20"]
    lines += ["evaluations <= 6. T3: mean of the last 10 >= 0.9 x the best 10-iteration mean. Iterations 1-150.", ""]
    lines += ["| arm | seed | start | peak (iteration) | first >= 90% | lowest after | T1 | std last 20 | T2 | last 10 "]
    lines[-1] += "| best 10 | T3 | largest drop |"
    lines += ["|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (arm, seed), d in runs.items():
        t = targets(d["charts/normalized_score"])
        yes = {True: "**met**", False: "missed"}
        lines += [
            f"| {arm} | {seed} | {t['start']:.1f} | {t['peak']:.1f} ({t['peak_at']}) | {t['first90']} | {t['low_after']:.1f}"
            f" ({t['low_after'] / t['peak']:.0%}) | {yes[t['T1']]} | {t['last20_std']:.1f} | {yes[t['T2']]} |"
            f" {t['last10']:.1f} | {t['best10']:.1f} | {yes[t['T3']]} ({t['last10'] / t['best10']:.2f}) |"
            f" {t['largest_drop']:.1f} |"
        ]
    lines += ["", "Per arm over its seeds (mean ± std; targets: seeds that meet it):", ""]
    lines += ["| arm | seeds | peak | lowest after / peak | T1 | std last 20 | T2 | last 10 | last 10 / best 10 | T3 |"]
    lines += ["|---|---|---|---|---|---|---|---|---|---|"]
    for arm in ARMS:
        ts = [targets(d["charts/normalized_score"]) for (a, _), d in runs.items() if a == arm]
        if not ts:
            continue

        def ms(values, fmt=".1f"):
            return f"{np.mean(values):{fmt}} ± {np.std(values):{fmt}}" if len(values) > 1 else f"{values[0]:{fmt}}"

        met = {k: f"{sum(bool(t[k]) for t in ts)}/{len(ts)}" for k in ("T1", "T2", "T3")}
        lines += [
            f"| {arm} | {len(ts)} | {ms([t['peak'] for t in ts])} | {ms([t['low_after'] / t['peak'] for t in ts], '.2f')}"
            f" | {met['T1']} | {ms([t['last20_std'] for t in ts])} | {met['T2']} | {ms([t['last10'] for t in ts])} |"
            f" {ms([t['last10'] / t['best10'] for t in ts], '.2f')} | {met['T3']} |"
        ]
    lines += ["", "Diagnostics, mean over blocks of 30 iterations (1-30, ..., 121-150):", ""]
    lines += ["| arm | seed | quantity | " + " | ".join(f"{30 * b + 1}-{30 * b + 30}" for b in range(5)) + " |"]
    lines += ["|---|---|---|" + "---|" * 5]
    for (arm, seed), d in runs.items():
        d["eval reward per step"] = d["charts/eval_return"] / d["charts/eval_length"]
        for tag, name in [*TAGS.items(), ("eval reward per step", "eval reward per step")]:
            v = d[tag][1:151]
            if np.isnan(v).all():
                continue
            blocks = [np.nanmean(v[30 * b : 30 * b + 30]) if len(v) > 30 * b else np.nan for b in range(5)]
            lines += [f"| {arm} | {seed} | {name} | " + " | ".join(f"{x:.4g}" for x in blocks) + " |"]
    (HERE / "targets.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    colours = {"default": "tab:blue", "anneal": "tab:orange", "gamma1": "tab:green"}
    fig, ax = plt.subplots(figsize=(9, 5))
    for arm in ARMS:
        curves = [d["charts/normalized_score"] for (a, _), d in runs.items() if a == arm]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        stack = np.stack([c[:n] for c in curves])
        label = f"{arm} ({ARMS[arm]}), {len(curves)} seed{'s' * (len(curves) > 1)}"
        label += ": mean, band = lowest to highest" if len(curves) > 1 else ""
        ax.plot(stack.mean(0), color=colours[arm], label=label)
        if len(curves) > 1:
            ax.fill_between(np.arange(n), stack.min(0), stack.max(0), color=colours[arm], alpha=0.2)
    ax.set(xlabel="iteration", ylabel="normalized score (20 episodes)", title="GRPO-DT, README CPU job, Hopper medium")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(HERE / "curves.png", dpi=120)

    shown = ["charts/normalized_score", "charts/eval_length", "losses/group_reward_std", "losses/dropped_fraction",
             "losses/kl", "losses/clipfrac", "losses/entropy", "charts/reset_step_mean", "charts/learning_rate"]  # fmt: skip
    fig, axes = plt.subplots(3, 3, figsize=(13, 9), sharex=True)
    for ax, tag in zip(axes.flat, shown):
        for (arm, seed), d in runs.items():
            ax.plot(d[tag], color=colours[arm], alpha=1.0 if seed == 1 else 0.5, lw=1, label=f"{arm} s{seed}")
        ax.set_title(TAGS[tag])
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("iteration")
    fig.tight_layout()
    fig.savefig(HERE / "diagnosis.png", dpi=100)


if __name__ == "__main__":
    main()

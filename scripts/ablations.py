"""The paper's ablations (Tables 3, 4 and 5) as DVC experiments, in one command.

    python scripts/ablations.py                # reproduce the baseline, queue, run, tabulate
    python scripts/ablations.py --dry-run      # print the dvc commands only
    python scripts/ablations.py --collect-only # re-tabulate experiments that already ran
    python scripts/ablations.py --seeds 1 2    # also: the full method and L_cls only at base.seed 1, 2

Each ablation is one ``dvc exp run --queue -S key=value ... <target>``; ``dvc queue start`` runs them one
at a time (two CPU-bound trainings on two cores are slower than one after the other). Every experiment
stops at the stage its table reads, so Table 3 and 5 rows re-run Step-1, the dump and its evaluation only,
and the Table 4 row re-runs pseudo-masks and Step-2. The workspace (the committed baseline) is the
reference row of every table. Experiments that already exist for this commit are reused unless
``--rerun`` is given, so an interrupted run continues where it stopped.

``--seeds`` measures how much of a difference between rows is noise: the full method and "L_cls only"
are re-run with each extra ``base.seed`` (new synthetic data, CLIP and Step-1), and a table gives their
mean and standard deviation over the committed seed and the extra ones.

The Markdown table is written to ``--out`` (default ``docs/ablations.md``) and printed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.params import load_params

ROOT = Path(__file__).resolve().parents[1]
STEP1_METRICS = "artifacts/reports/step1.json"
STEP2_METRICS = "artifacts/reports/step2.json"
PSEUDO_METRICS = "artifacts/reports/pseudo_masks.json"
TABLE3_COLUMNS = (("mIoU", "IoU"), ("PointIt", "PointIt"), ("P@0.5", "P@0.5"), ("PointM", "PointM"))
NO_CALIBRATION = {"step1.calibration_positive": False, "step1.calibration_negative": False}


@dataclass(frozen=True)
class Ablation:
    """One row of a paper table: the params it changes and the last stage whose metrics it needs."""

    table: str
    name: str
    label: str
    params: Mapping[str, object] = field(default_factory=dict)
    target: str = "evaluate_step1"

    @property
    def is_baseline(self) -> bool:
        return not self.params


ABLATIONS: tuple[Ablation, ...] = (
    # Table 3: components of Step-1 (L_cls, bilateral prompt, the two terms of the calibration loss).
    Ablation("3", "abl-t3-cls", "L_cls only", {"step1.prompt": "none", **NO_CALIBRATION}),
    Ablation("3", "abl-t3-t2v", "+ P_t2v", {"step1.prompt": "t2v", **NO_CALIBRATION}),
    Ablation("3", "abl-t3-bp", "+ BP", NO_CALIBRATION),
    Ablation("3", "abl-t3-bp-pterm", "+ BP + P_term", {"step1.calibration_negative": False}),
    Ablation("3", "abl-t3-bp-nterm", "+ BP + N_term", {"step1.calibration_positive": False}),
    Ablation("3", "baseline", "+ BP + P_term + N_term (full)"),
    # Table 4: positive response map selection.
    Ablation("4", "abl-t4-no-prms", "w/o PRMS", {"pseudo_masks.prms": False}, target="evaluate_step2"),
    Ablation("4", "baseline", "w/ PRMS"),
    # Table 5: number of negative queries N (Eq. 7; the table's column is N + 1) and K (Eq. 8).
    *(Ablation("5N", f"abl-t5-n{n + 1}", f"N + 1 = {n + 1}", {"step1.num_negatives": n})
      for n in (0, 1, 5, 11, 23)),
    Ablation("5N", "baseline", "N + 1 = 48"),
    Ablation("5K", f"abl-t5-k{3}", "K = 3", {"step1.calibration_negatives": 3}),
    Ablation("5K", "baseline", "K = 6"),
    Ablation("5K", f"abl-t5-k{12}", "K = 12", {"step1.calibration_negatives": 12}),
)

# Rows re-run at other seeds by ``--seeds``: (short name, Table 3 row).
SEED_ROWS = (("full", "baseline"), ("cls", "abl-t3-cls"))


def seed_experiments(seeds: Sequence[int]) -> list[Ablation]:
    """The ``--seeds`` experiments: each SEED_ROWS row with ``base.seed`` set, named ``seed<S>-<short>``."""
    rows = {a.name: a for a in ABLATIONS if a.table == "3"}
    return [Ablation("seed", f"seed{s}-{short}", rows[row].label, {**rows[row].params, "base.seed": s})
            for s in seeds for short, row in SEED_ROWS]


# The paper's own figures (RefCOCOg (U) train for Tables 3 and 5, val IoU for Table 4), to compare the
# direction of each effect. Keys: IoU, PointIt, P@0.5, PointM in percent.
PAPER = {
    "abl-t3-cls": {"IoU": 18.94, "PointIt": 51.42, "P@0.5": 3.87, "PointM": 36.93},
    "abl-t3-t2v": {"IoU": 19.70, "PointIt": 53.47, "P@0.5": 4.21, "PointM": 39.14},
    "abl-t3-bp": {"IoU": 20.43, "PointIt": 56.49, "P@0.5": 4.47, "PointM": 40.92},
    "abl-t3-bp-pterm": {"IoU": 24.18, "PointIt": 64.03, "P@0.5": 8.33, "PointM": 49.85},
    "abl-t3-bp-nterm": {"IoU": 22.43, "PointIt": 60.81, "P@0.5": 6.44, "PointM": 45.58},
    "baseline": {"IoU": 27.81, "PointIt": 66.99, "P@0.5": 12.75, "PointM": 53.69},
    "abl-t5-n1": {"IoU": 11.16, "PointIt": 16.73, "PointM": 8.01},
    "abl-t5-n2": {"IoU": 19.91, "PointIt": 43.35, "PointM": 32.96},
    "abl-t5-n6": {"IoU": 22.19, "PointIt": 58.18, "PointM": 43.71},
    "abl-t5-n12": {"IoU": 24.05, "PointIt": 64.73, "PointM": 49.92},
    "abl-t5-n24": {"IoU": 26.19, "PointIt": 66.45, "PointM": 52.46},
    "abl-t5-k3": {"IoU": 27.05, "PointIt": 65.81, "PointM": 52.94},
    "abl-t5-k12": {"IoU": 27.63, "PointIt": 66.82, "PointM": 53.16},
}
PAPER_T4 = ("RefCOCO+ val IoU 22.31 w/o PRMS; the paper reports PRMS raising IoU on every dataset, "
            "by about 10 % relative on RefCOCO+")


def dvc(*args: str, capture: bool = False, cwd: Path = ROOT) -> str:
    """Run ``dvc <args>``; raise with its output when it fails."""
    proc = subprocess.run(["dvc", *args], cwd=cwd, text=True,
                          capture_output=capture)
    if proc.returncode != 0:
        detail = (proc.stderr or "") + (proc.stdout or "") if capture else ""
        raise SystemExit(f"ablations: `dvc {' '.join(args)}` failed (exit {proc.returncode}) {detail}")
    return proc.stdout if capture else ""


def queue_command(ablation: Ablation) -> list[str]:
    """The ``dvc exp run --queue`` arguments of one ablation."""
    args = ["exp", "run", "--queue", "-n", ablation.name]
    for key, value in ablation.params.items():
        text = str(value).lower() if isinstance(value, bool) else str(value)
        args += ["-S", f"{key}={text}"]
    return [*args, ablation.target]


def experiments_to_run(seeds: Sequence[int] = ()) -> list[Ablation]:
    """Distinct non-baseline ablations, in table order, then the ``--seeds`` experiments."""
    seen: dict[str, Ablation] = {}
    for a in (*ABLATIONS, *seed_experiments(seeds)):
        if not a.is_baseline:
            seen.setdefault(a.name, a)
    return list(seen.values())


def existing_experiments(cwd: Path = ROOT) -> set[str]:
    """Names of the experiments already derived from the current commit."""
    return set(dvc("exp", "list", "--name-only", capture=True, cwd=cwd).split())


def wait_for_queue(poll_s: float = 15.0, cwd: Path = ROOT) -> None:
    """Block until no queued or running task is left; report progress as tasks finish."""
    last = ""
    while True:
        status = dvc("queue", "status", capture=True, cwd=cwd)
        rows = [line.split() for line in status.splitlines()
                if line.strip() and not line.startswith(("Task", "Worker"))]
        states = [r[-1] for r in rows if r]
        summary = ", ".join(f"{s}: {states.count(s)}" for s in sorted(set(states)))
        if summary != last:
            print(f"ablations: [{time.strftime('%H:%M:%S')}] {summary}", flush=True)
            last = summary
        if not any(s in ("Queued", "Running") for s in states):
            failed = [r[1] for r in rows if r and r[-1] == "Failed"]
            if failed:
                print(f"ablations: failed experiments {failed}; see `dvc queue logs <name>`", file=sys.stderr)
            return
        time.sleep(poll_s)


def collect_metrics(exp_show: Sequence[Mapping]) -> dict[str, dict[str, dict]]:
    """``{experiment name or 'baseline': {metrics file: data}}`` from ``dvc exp show --json``.

    The baseline is the commit row (the committed metrics); experiments are its children. Only
    successfully finished experiments carry metrics.
    """
    out: dict[str, dict[str, dict]] = {}
    for row in exp_show:
        if row.get("rev") == "workspace":
            continue
        out["baseline"] = _metrics_of(row)
        for exp in row.get("experiments") or []:
            revs = exp.get("revs") or []
            if revs and revs[0].get("data") and not revs[0].get("error"):
                out.setdefault(exp.get("name") or revs[0].get("name"), _metrics_of(revs[0]))
    return out


def _metrics_of(entry: Mapping) -> dict[str, dict]:
    metrics = (entry.get("data") or {}).get("metrics") or {}
    return {path: (m or {}).get("data") or {} for path, m in metrics.items()}


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def _paper(name: str, key: str) -> str:
    value = PAPER.get(name, {}).get(key)
    return "–" if value is None else f"{value:.2f}"


def _mean_std(values: Sequence[float]) -> str:
    if len(values) < 2:
        return "–"
    return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}"


def render_seed_noise(results: Mapping[str, Mapping[str, dict]], seeds: Sequence[int], base_seed: int,
                      split: str = "val") -> list[str]:
    """Mean ± sample standard deviation over ``base_seed`` and ``seeds`` of the SEED_ROWS rows."""
    lines = ["", "### Seed noise: Table 3 rows over seeds " + ", ".join(map(str, [base_seed, *seeds])), "",
             "| setting | runs | mIoU | PointIt | P@0.5 | PointM |", "|---|---|---|---|---|---|"]
    labels = {a.name: a.label for a in ABLATIONS if a.table == "3"}
    for short, row in SEED_ROWS:
        runs = [results.get(name, {}).get(STEP1_METRICS, {}).get(split)
                for name in (row, *(f"seed{s}-{short}" for s in seeds))]
        runs = [r for r in runs if r]
        cells = [_mean_std([r[k] for r in runs if k in r]) for k, _ in TABLE3_COLUMNS]
        lines.append(f"| {labels[row]} | {len(runs)} | " + " | ".join(cells) + " |")
    return lines


def render_markdown(results: Mapping[str, Mapping[str, dict]], split: str = "val",
                    seeds: Sequence[int] = (), base_seed: int = 0) -> str:
    """The three tables, our figures beside the paper's, in percent."""
    command = "python scripts/ablations.py" + (" --seeds " + " ".join(map(str, seeds)) if seeds else "")
    lines = [f"Metrics on the embedded default's `{split}` split, in percent; the paper's figures "
             f"(RefCOCOg (U)) in brackets. Regenerate with `{command}`.", ""]

    def step1(name: str, key: str) -> float | None:
        return results.get(name, {}).get(STEP1_METRICS, {}).get(split, {}).get(key)

    lines += ["### Table 3: Step-1 components (response maps)", "",
              "| setting | mIoU | PointIt | P@0.5 | PointM |", "|---|---|---|---|---|"]
    for a in (a for a in ABLATIONS if a.table == "3"):
        cells = [f"{_pct(step1(a.name, k))} ({_paper(a.name, p)})" for k, p in TABLE3_COLUMNS]
        lines.append(f"| {a.label} | " + " | ".join(cells) + " |")

    lines += ["", "### Table 4: positive response map selection (Step-2 on pseudo-masks)", "",
              "| setting | pseudo-mask mIoU (train) | Step-2 mIoU | Step-2 oIoU | Step-2 PointM |",
              "|---|---|---|---|---|"]
    for a in (a for a in ABLATIONS if a.table == "4"):
        res = results.get(a.name, {})
        pseudo = res.get(PSEUDO_METRICS, {}).get("refined", {}).get("mIoU")
        s2 = res.get(STEP2_METRICS, {}).get(split, {})
        lines.append(f"| {a.label} | {_pct(pseudo)} | {_pct(s2.get('mIoU'))} | {_pct(s2.get('oIoU'))} | "
                     f"{_pct(s2.get('PointM'))} |")
    lines.append(f"\nPaper: {PAPER_T4}.")

    for table, title in (("5N", "Table 5: negatives N of Eq. 7"), ("5K", "Table 5: negatives K of Eq. 8")):
        lines += ["", f"### {title}", "", "| setting | mIoU | PointIt | PointM |", "|---|---|---|---|"]
        for a in (a for a in ABLATIONS if a.table == table):
            cells = [f"{_pct(step1(a.name, k))} ({_paper(a.name, p)})"
                     for k, p in (("mIoU", "IoU"), ("PointIt", "PointIt"), ("PointM", "PointM"))]
            lines.append(f"| {a.label} | " + " | ".join(cells) + " |")
    if seeds:
        lines += render_seed_noise(results, seeds, base_seed, split)
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "ablations.md")
    parser.add_argument("--dry-run", action="store_true", help="print the dvc commands and exit")
    parser.add_argument("--collect-only", action="store_true", help="only tabulate existing experiments")
    parser.add_argument("--rerun", action="store_true",
                        help="remove and re-run existing ablation experiments")
    parser.add_argument("--split", default="val")
    parser.add_argument("--seeds", type=int, nargs="*", default=[],
                        help="extra base.seed values for the full method and L_cls only (seed noise)")
    args = parser.parse_args(argv)

    base_seed = load_params(ROOT / "params.yaml").base.seed
    if base_seed in args.seeds:
        parser.error(f"--seeds: {base_seed} is params.yaml's base.seed, already the committed baseline")
    todo = experiments_to_run(args.seeds)
    if args.dry_run:
        print("dvc repro")
        for a in todo:
            print("dvc " + " ".join(queue_command(a)))
        print("dvc queue start --jobs 1")
        return
    started = time.monotonic()
    if not args.collect_only:
        print("ablations: reproducing the baseline (no-op when dvc.lock is up to date)", flush=True)
        dvc("repro")
        done = existing_experiments()
        if args.rerun and done & {a.name for a in todo}:
            dvc("exp", "remove", *sorted(done & {a.name for a in todo}))
            done = set()
        queued = [a for a in todo if a.name not in done]
        for a in queued:
            dvc(*queue_command(a), capture=True)
        print(f"ablations: queued {len(queued)} experiments ({len(todo) - len(queued)} reused)", flush=True)
        if queued:
            dvc("queue", "start", "--jobs", "1", capture=True)
            wait_for_queue()
    results = collect_metrics(json.loads(dvc("exp", "show", "--json", capture=True)))
    missing = [a.name for a in todo if a.name not in results]
    table = render_markdown(results, args.split, args.seeds, base_seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".md.tmp")
    tmp.write_text(table)
    tmp.replace(args.out)
    print(table)
    print(f"ablations: wrote {args.out} in {time.monotonic() - started:.0f} s"
          + (f"; missing results: {missing}" if missing else ""))
    if missing:
        raise SystemExit(1)


if __name__ == "__main__":
    main()

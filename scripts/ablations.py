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

``--seeds`` measures how much of a difference between rows is noise: the full method, "+ BP" and
"L_cls only" are re-run with each extra ``base.seed`` (new synthetic data and Step-1; the CLIP is the
shipped one, rebuilt per seed only under ``model.clip.pretrained: embedded``), and a table gives their
mean and standard deviation over the committed seed and the extra ones. A last section checks the
paper's directions on those means (Table 3 in object hit, Table 4, Table 5's collapse at N = 0).

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
SEED_ROWS = (("full", "baseline"), ("bp", "abl-t3-bp"), ("cls", "abl-t3-cls"))

# The object-hit kinds whose expressions name a shape (``object_hit_by_kind`` keys of the embedded
# default): the words calibration's frozen scorer reads and whole-image classification barely does.
SHAPE_KINDS = ("attribute: shape", "attribute: size+shape", "attribute: colour+shape",
               "attribute: size+colour+shape")
# Table 5's collapse: with N = 0 negatives (N + 1 = 1) Eq. 7 has nothing to tell apart.
COLLAPSE_OBJECT_HIT = 0.30


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
    successfully finished experiments count: a running one is listed with the metrics it started from
    (the baseline's), so an executor state other than ``success`` leaves it out.
    """
    out: dict[str, dict[str, dict]] = {}
    for row in exp_show:
        if row.get("rev") == "workspace":
            continue
        out["baseline"] = _metrics_of(row)
        for exp in row.get("experiments") or []:
            revs = exp.get("revs") or []
            state = (exp.get("executor") or {}).get("state", "success")
            if state == "success" and revs and revs[0].get("data") and not revs[0].get("error"):
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


def shape_object_hit(step1_split: Mapping) -> float | None:
    """Object hit over the expressions that name a shape (:data:`SHAPE_KINDS`), weighted by count;
    None where the split has no ``object_hit_by_kind`` (only val has it, and only synthetic data)."""
    kinds = step1_split.get("object_hit_by_kind") or {}
    parts = [kinds[k] for k in SHAPE_KINDS if k in kinds]
    n = sum(part["n"] for part in parts)
    return sum(part["rate"] * part["n"] for part in parts) / n if n else None


def step1_value(step1_split: Mapping, key: str) -> float | None:
    """A Step-1 figure of a split: a metrics.json key, or ``object_hit_shape`` (:func:`shape_object_hit`)."""
    return shape_object_hit(step1_split) if key == "object_hit_shape" else step1_split.get(key)


# Seed-noise columns: (metrics key, column title).
SEED_COLUMNS = (("object_hit", "object hit"), ("object_hit_shape", "object hit, shape kinds"),
                ("mIoU", "mIoU"), ("PointIt", "PointIt"), ("P@0.5", "P@0.5"), ("PointM", "PointM"))


def seed_runs(results: Mapping[str, Mapping[str, dict]], row: str, seeds: Sequence[int],
              split: str = "val") -> list[dict]:
    """The Step-1 metrics of one SEED_ROWS row at the committed seed and each extra seed that finished."""
    short = next(short for short, name in SEED_ROWS if name == row)
    runs = [results.get(name, {}).get(STEP1_METRICS, {}).get(split)
            for name in (row, *(f"seed{s}-{short}" for s in seeds))]
    return [r for r in runs if r]


def seed_values(results: Mapping[str, Mapping[str, dict]], row: str, key: str, seeds: Sequence[int],
                split: str = "val") -> list[float]:
    values = (step1_value(r, key) for r in seed_runs(results, row, seeds, split))
    return [v for v in values if v is not None]


def render_seed_noise(results: Mapping[str, Mapping[str, dict]], seeds: Sequence[int], base_seed: int,
                      split: str = "val") -> list[str]:
    """Mean ± sample standard deviation over ``base_seed`` and ``seeds`` of the SEED_ROWS rows."""
    lines = ["", "### Seed noise: Table 3 rows over seeds " + ", ".join(map(str, [base_seed, *seeds])), "",
             "| setting | runs | " + " | ".join(title for _, title in SEED_COLUMNS) + " |",
             "|---|---|" + "---|" * len(SEED_COLUMNS)]
    labels = {a.name: a.label for a in ABLATIONS if a.table == "3"}
    for _, row in SEED_ROWS:
        cells = [_mean_std(seed_values(results, row, k, seeds, split)) for k, _ in SEED_COLUMNS]
        lines.append(f"| {labels[row]} | {len(seed_runs(results, row, seeds, split))} | "
                     + " | ".join(cells) + " |")
    return lines


@dataclass(frozen=True)
class Direction:
    """One of the paper's directions, checked on our figures: what it claims, the evidence, the verdict."""

    claim: str
    evidence: str
    holds: bool | None  # None: not measurable from the results at hand


def _pooled_sd(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Pooled sample standard deviation of two groups (None with fewer than two values in either)."""
    if len(a) < 2 or len(b) < 2:
        return None
    dof = len(a) + len(b) - 2
    return (((len(a) - 1) * statistics.variance(a) + (len(b) - 1) * statistics.variance(b)) / dof) ** 0.5


def directions(results: Mapping[str, Mapping[str, dict]], seeds: Sequence[int], split: str = "val"
               ) -> list[Direction]:
    """The paper's directions that the embedded default is asked to show (issue 27), on means over seeds.

    Table 3 compares L_cls only, + BP and the full method in object hit (the share of expressions whose
    map peaks on the referred object): calibration must beat + BP by more than one pooled standard
    deviation on the expressions that name a shape and lose at most one pooled standard deviation of
    PointM. Table 4 asks PRMS on ≥ off, Table 5 that N = 0 negatives collapse.
    """
    def mean(row: str, key: str) -> float | None:
        values = seed_values(results, row, key, seeds, split)
        return statistics.mean(values) if values else None

    out = []
    hits = [mean(row, "object_hit") for row in ("abl-t3-cls", "abl-t3-bp", "baseline")]
    out.append(Direction(
        "Table 3, object hit: L_cls only ≤ + BP ≤ full",
        " ≤ ".join(_pct(h) for h in hits),
        None if None in hits else hits[0] <= hits[1] <= hits[2]))
    for key, what in (("object_hit_shape", "object hit on shape kinds"), ("PointM", "PointM")):
        bp, full = (seed_values(results, row, key, seeds, split) for row in ("abl-t3-bp", "baseline"))
        sd = _pooled_sd(bp, full)
        if sd is None:
            out.append(Direction(f"Table 3, {what}: full against + BP",
                                 "needs two runs of each row (--seeds)", None))
            continue
        gain = statistics.mean(full) - statistics.mean(bp)
        holds = gain > sd if key == "object_hit_shape" else gain >= -sd
        claim = ("calibration beats + BP by more than one pooled SD" if key == "object_hit_shape"
                 else "calibration loses at most one pooled SD")
        out.append(Direction(f"Table 3, {what}: {claim}",
                             f"full − + BP = {100 * gain:+.2f}, pooled SD {100 * sd:.2f} "
                             f"({len(full)} + {len(bp)} runs)", holds))
    t4 = {name: results.get(name, {}).get(PSEUDO_METRICS, {}) for name in ("abl-t4-no-prms", "baseline")}
    for part, what in (("raw_selected", "selected-map mIoU"), ("refined", "pseudo-mask mIoU")):
        off, on = (t4[name].get(part, {}).get("mIoU") for name in ("abl-t4-no-prms", "baseline"))
        out.append(Direction(f"Table 4, {what} (train): PRMS on ≥ off", f"{_pct(on)} against {_pct(off)}",
                             None if None in (on, off) else on >= off))
    collapse = results.get("abl-t5-n1", {}).get(STEP1_METRICS, {}).get(split, {}).get("object_hit")
    out.append(Direction(f"Table 5, N + 1 = 1 collapses: object hit ≤ {_pct(COLLAPSE_OBJECT_HIT)}",
                         _pct(collapse), None if collapse is None else collapse <= COLLAPSE_OBJECT_HIT))
    return out


def render_directions(found: Sequence[Direction]) -> list[str]:
    verdict = {True: "holds", False: "does not hold", None: "not measured"}
    lines = ["", "### The paper's directions on these figures", "", "| direction | ours | verdict |",
             "|---|---|---|"]
    return lines + [f"| {d.claim} | {d.evidence} | {verdict[d.holds]} |" for d in found]


def render_markdown(results: Mapping[str, Mapping[str, dict]], split: str = "val",
                    seeds: Sequence[int] = (), base_seed: int = 0) -> str:
    """The three tables, our figures beside the paper's, in percent."""
    command = "python scripts/ablations.py" + (" --seeds " + " ".join(map(str, seeds)) if seeds else "")
    lines = [f"Metrics on the embedded default's `{split}` split, in percent; the paper's figures "
             f"(RefCOCOg (U)) in brackets. Object hit is the share of expressions whose map peaks on the "
             f"referred object; the paper has no such column. Regenerate with `{command}`.", ""]

    def step1(name: str, key: str) -> float | None:
        return step1_value(results.get(name, {}).get(STEP1_METRICS, {}).get(split, {}), key)

    lines += ["### Table 3: Step-1 components (response maps)", "",
              "| setting | object hit | object hit, shape kinds | mIoU | PointIt | P@0.5 | PointM |",
              "|---|---|---|---|---|---|---|"]
    for a in (a for a in ABLATIONS if a.table == "3"):
        cells = [_pct(step1(a.name, "object_hit")), _pct(step1(a.name, "object_hit_shape")),
                 *(f"{_pct(step1(a.name, k))} ({_paper(a.name, p)})" for k, p in TABLE3_COLUMNS)]
        lines.append(f"| {a.label} | " + " | ".join(cells) + " |")

    lines += ["", "### Table 4: positive response map selection (Step-2 on pseudo-masks)", "",
              "| setting | selected-map mIoU (train) | pseudo-mask mIoU (train) | Step-2 mIoU | Step-2 oIoU "
              "| Step-2 PointM |", "|---|---|---|---|---|---|"]
    for a in (a for a in ABLATIONS if a.table == "4"):
        res = results.get(a.name, {})
        pseudo = res.get(PSEUDO_METRICS, {})
        s2 = res.get(STEP2_METRICS, {}).get(split, {})
        lines.append(f"| {a.label} | {_pct(pseudo.get('raw_selected', {}).get('mIoU'))} | "
                     f"{_pct(pseudo.get('refined', {}).get('mIoU'))} | {_pct(s2.get('mIoU'))} | "
                     f"{_pct(s2.get('oIoU'))} | {_pct(s2.get('PointM'))} |")
    lines.append(f"\nPaper: {PAPER_T4}.")

    for table, title in (("5N", "Table 5: negatives N of Eq. 7"), ("5K", "Table 5: negatives K of Eq. 8")):
        lines += ["", f"### {title}", "", "| setting | object hit | mIoU | PointIt | PointM |",
                  "|---|---|---|---|---|"]
        for a in (a for a in ABLATIONS if a.table == table):
            cells = [_pct(step1(a.name, "object_hit")),
                     *(f"{_pct(step1(a.name, k))} ({_paper(a.name, p)})"
                       for k, p in (("mIoU", "IoU"), ("PointIt", "PointIt"), ("PointM", "PointM")))]
            lines.append(f"| {a.label} | " + " | ".join(cells) + " |")
    if seeds:
        lines += render_seed_noise(results, seeds, base_seed, split)
    lines += render_directions(directions(results, seeds, split))
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

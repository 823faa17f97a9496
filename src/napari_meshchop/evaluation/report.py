"""An experiment's aggregate, beside the paper's Table 1, and paired tests between two.

Scores come from the runs' ``results.json`` (one record per test subject, from the
evaluation core), aggregated two ways:

* across runs: each run's score is the mean over its fold's test subjects; mean (SD) over
  the runs. The paper's "mean (SD)" is most likely this one (its SDs are too small to be
  across subjects);
* across subjects: each subject's score is the mean over its fold's restarts (and, with
  ensembles, also the ensemble's own prediction); mean (SD), median and IQR over subjects.

Two experiments are compared subject by subject (paired by the pair id) with the Wilcoxon
signed-rank test, one test per headline metric, and Holm's correction over those tests.
"""

from __future__ import annotations

import math
import os
import warnings
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from napari_meshchop import files
from napari_meshchop.evaluation.metrics import METRICS, summarize

REPORT_MD, REPORT_JSON = "report.md", "report.json"
FORMAT = "napari-meshchop/experiment-report"
HEADLINE = ("macro_dice", "dice", "avd", "mcc")
LABELS = {"macro_dice": "Dice (macro)", "dice": "Dice (lesion)", "avd": "AVD", "mcc": "MCC",
          "precision": "precision", "recall": "recall", "true_ml": "true volume (mL)",
          "pred_ml": "predicted volume (mL)"}
# arXiv 2503.05531, Table 1: mean (SD) of Dice, AVD and MCC, by MeshNet width.
PAPER = {
    26: {"model": "MeshNet-26", "dice": (0.876, 0.016), "avd": (0.245, 0.036),
         "mcc": (0.760, 0.030)},
    16: {"model": "MeshNet-16", "dice": (0.873, 0.007), "avd": (0.249, 0.033),
         "mcc": (0.757, 0.013)},
    5: {"model": "MeshNet-5", "dice": (0.848, 0.023), "avd": (0.280, 0.060),
        "mcc": (0.708, 0.042)},
}
PAPER_METRIC = {"macro_dice": "dice", "dice": "dice", "avd": "avd", "mcc": "mcc"}


# ---- statistics -------------------------------------------------------------------------

def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the order given.

    The i-th smallest of m p-values becomes max over j <= i of min(1, (m - j + 1) p_(j)).
    NaN p-values stay NaN and do not count in m.
    """
    p = np.asarray(pvalues, dtype=np.float64)
    adjusted = np.full(len(p), np.nan)
    valid = np.flatnonzero(~np.isnan(p))
    running = 0.0
    for rank, index in enumerate(valid[np.argsort(p[valid], kind="stable")]):
        running = max(running, min(1.0, (len(valid) - rank) * p[index]))
        adjusted[index] = running
    return adjusted.tolist()


def wilcoxon(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Two-sided Wilcoxon signed-rank test of paired scores ``a`` and ``b``.

    Pairs with a NaN are dropped; with no difference at all, p is 1.
    """
    from scipy import stats

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    keep = np.isfinite(a) & np.isfinite(b)
    d = a[keep] - b[keep]
    if not len(d):
        return {"n": 0, "statistic": math.nan, "p": math.nan, "median_difference": math.nan}
    if not np.any(d):
        return {"n": len(d), "statistic": 0.0, "p": 1.0, "median_difference": 0.0}
    with warnings.catch_warnings():  # small samples: scipy warns, and answers all the same
        warnings.simplefilter("ignore")
        result = stats.wilcoxon(d)
    return {"n": len(d), "statistic": float(result.statistic), "p": float(result.pvalue),
            "median_difference": float(np.median(d))}


def compare(mine: dict[str, dict], other: dict[str, dict],
            metrics: Sequence[str] = HEADLINE) -> dict:
    """Per-subject scores of two experiments, paired by subject: a Wilcoxon test per metric
    and Holm's correction over the metrics."""
    paired = sorted(set(mine) & set(other))
    tests = []
    for m in metrics:
        a, b = [mine[s][m] for s in paired], [other[s][m] for s in paired]
        test = wilcoxon(_floats(a), _floats(b))
        tests.append({"metric": m, "mean": _mean(a), "other_mean": _mean(b), **test})
    for test, adjusted in zip(tests, holm([t["p"] for t in tests])):
        test["p_holm"] = adjusted
    return {"paired_subjects": len(paired), "only_here": len(set(mine) - set(other)),
            "only_there": len(set(other) - set(mine)), "tests": tests}


def _floats(values) -> list[float]:
    return [math.nan if v is None else float(v) for v in values]


def _mean(values) -> float:
    a = np.asarray(_floats(values), dtype=np.float64)
    a = a[np.isfinite(a)]
    return float(a.mean()) if len(a) else math.nan


# ---- aggregation ------------------------------------------------------------------------

def subject_scores(records_by_run: Sequence[tuple[int, list[dict]]]) -> dict[str, dict]:
    """Each subject's mean score over the runs that tested it (``(fold, records)`` pairs);
    records with an error are left out."""
    by_subject = defaultdict(list)
    for fold, records in records_by_run:
        for row in records:
            if not row.get("error"):
                by_subject[row["subject"]].append((fold, row))
    return {subject: {"fold": rows[0][0], "runs": len(rows),
                      **{m: _mean([row.get(m) for _, row in rows]) for m in METRICS}}
            for subject, rows in sorted(by_subject.items())}


def _across(values_by_metric: dict[str, list]) -> dict[str, dict]:
    return {m: summarize(_floats(values_by_metric[m])) for m in METRICS}


def build(out: str | os.PathLike, plan, done: dict, ensembles: dict,
          other: dict | None = None) -> dict:
    """The report of the experiment in ``out`` (what ``report.json`` holds).

    ``plan`` is its plan, ``done`` each planned run's result by key (None: not complete),
    ``ensembles`` each fold's ensemble records (None: not evaluated), ``other`` the report of
    an experiment to compare with.
    """
    complete = [r for r in done.values() if r is not None]
    per_run = []
    for result in complete:
        ok = [row for row in result.records if not row.get("error")]
        per_run.append({"run": result.run.key, "fold": result.run.fold,
                        "restart": result.run.restart, "seed": result.run.seed,
                        "subjects": len(result.records),
                        "failed": len(result.records) - len(ok),
                        **{m: _mean([row.get(m) for row in ok]) for m in METRICS}})
    subjects = subject_scores([(r.run.fold, r.records) for r in complete])
    ensemble_subjects = subject_scores([(k, rows) for k, rows in ensembles.items() if rows])
    across_runs = _across({m: [r[m] for r in per_run] for m in METRICS})
    across_subjects = _across({m: [s[m] for s in subjects.values()] for m in METRICS})
    per_fold = []
    for k in plan.folds:
        runs = [r for r in per_run if r["fold"] == k]
        per_fold.append({"fold": k, "runs": len(runs),
                         "subjects": sum(s["fold"] == k for s in subjects.values()),
                         "ensemble": ensembles[k] is not None,
                         **{m: summarize(_floats(r[m] for r in runs)) for m in HEADLINE}})
    channels = plan.config.channels
    paper = PAPER.get(channels)
    parity = []
    for m in HEADLINE:
        row = {"metric": m, "label": LABELS[m], "runs": across_runs[m],
               "subjects": across_subjects[m]}
        if paper is not None:
            mean, sd = paper[PAPER_METRIC[m]]
            row.update(paper_mean=mean, paper_sd=sd,
                       difference=across_runs[m]["mean"] - mean)
        parity.append(row)
    doc = {
        "format": FORMAT, "version": 1, "experiment": os.fspath(Path(out).resolve()),
        "plan": plan.to_dict(), "channels": channels,
        "complete": len(complete) == len(plan.runs),
        "runs": {"planned": len(plan.runs), "complete": len(complete),
                 "missing": [key for key, r in done.items() if r is None]},
        "paper": None if paper is None else {
            "model": paper["model"], "table": "arXiv 2503.05531, Table 1",
            **{k: list(paper[k]) for k in ("dice", "avd", "mcc")}},
        "parity": parity, "across_runs": across_runs, "across_subjects": across_subjects,
        "ensemble": None if not ensemble_subjects else {
            "folds": [k for k, rows in ensembles.items() if rows],
            "across_subjects": _across({m: [s[m] for s in ensemble_subjects.values()]
                                        for m in METRICS}),
            "subjects": ensemble_subjects},
        "per_fold": per_fold, "per_run": per_run, "subjects": subjects, "comparison": None,
    }
    if other is not None:
        doc["comparison"] = {"other": other["experiment"], "other_channels": other["channels"],
                             "scores": "per subject, the mean over its fold's restarts",
                             **compare(subjects, other["subjects"])}
    return _plain(doc)


def _plain(obj):
    """NaN as None (JSON has no NaN), numpy numbers as Python ones."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return None if math.isnan(obj) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


# ---- Markdown -----------------------------------------------------------------------------

def _num(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _mean_sd(s: dict) -> str:
    return "n/a" if not s or s.get("mean") is None else f"{s['mean']:.3f} ({s['sd']:.3f})"


def _median_iqr(s: dict) -> str:
    if not s or s.get("median") is None:
        return "n/a"
    return f"{s['median']:.3f} [{s['q1']:.3f}, {s['q3']:.3f}]"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def markdown(doc: dict) -> str:
    """The report as Markdown: parity with the paper first, then the details."""
    plan, runs = doc["plan"], doc["runs"]
    config = plan["config"]
    seeds = plan["seeds"]
    lines = [(f"# Experiment: MeshNet-{doc['channels']}, {len(plan['folds'])} outer folds x "
              f"{plan['restarts']} restarts"), ""]
    state = "complete" if doc["complete"] else "INCOMPLETE"
    lines += [(f"{runs['complete']} of {runs['planned']} runs done ({state}). Each run trains "
               f"{config['epochs']} epochs on its outer fold's whole training set (seeds "
               f"{seeds[0]}..{seeds[-1]}, lr {config['lr']:g}, preprocessing "
               f"{config['preprocess']['name']}) and is tested on the fold's test set. "
               f"Data: `{config['data_dir']}`."), ""]
    if runs["missing"]:
        lines += [f"Missing runs: {', '.join(runs['missing'])}.", ""]
    paper = doc["paper"]
    if paper is None:
        lines += ["## Parity with the paper", "",
                  (f"The paper's Table 1 has MeshNet-5, -16 and -26 only; no row for "
                   f"{doc['channels']} channels."), ""]
        head = ["metric", "across runs: mean (SD)", "across subjects: mean (SD)",
                "median [IQR] over subjects"]
        rows = [[r["label"], _mean_sd(r["runs"]), _mean_sd(r["subjects"]),
                 _median_iqr(r["subjects"])] for r in doc["parity"]]
    else:
        lines += [f"## Parity with the paper ({paper['table']}, {paper['model']})", ""]
        n_runs = doc["across_runs"]["dice"]["n"]
        n_subjects = doc["across_subjects"]["dice"]["n"]
        head = ["metric", f"paper: {paper['model']}", f"this: across runs (n={n_runs})",
                "difference", f"across subjects (n={n_subjects})", "median [IQR] over subjects"]
        rows = [[r["label"], f"{r['paper_mean']:.3f} ({r['paper_sd']:.3f})", _mean_sd(r["runs"]),
                 "n/a" if r["difference"] is None else f"{r['difference']:+.3f}",
                 _mean_sd(r["subjects"]), _median_iqr(r["subjects"])] for r in doc["parity"]]
    lines += _table(head, rows)
    lines += ["", ("Across runs: a run's score is the mean over its test subjects, then mean "
               "(SD) over the runs (the paper's SD is most likely this one). Across subjects: "
               "a subject's score is the mean over its fold's restarts. Lesion Dice is "
               "2|P&T|/(|P|+|T|); macro Dice the mean of lesion and background Dice. The "
               "paper's one Dice column is compared with both; it is most likely macro Dice "
               "(its MCC is about 2 x Dice - 1 on every row)."), ""]
    if doc["ensemble"]:
        ens = doc["ensemble"]
        lines += [(f"## Ensembles of each fold's restarts (folds "
                   f"{', '.join(map(str, ens['folds']))})"), ""]
        lines += _table(["metric", "across subjects: mean (SD)", "median [IQR]"],
                        [[LABELS[m], _mean_sd(ens["across_subjects"][m]),
                          _median_iqr(ens["across_subjects"][m])] for m in HEADLINE])
        lines += ["", "Each subject scored on the mean softmax of its fold's restarts.", ""]
    lines += ["## Per fold (mean (SD) across restarts)", ""]
    lines += _table(["fold", "runs", "test subjects", *(LABELS[m] for m in HEADLINE)],
                    [[str(f["fold"]), str(f["runs"]), str(f["subjects"]),
                      *(_mean_sd(f[m]) for m in HEADLINE)] for f in doc["per_fold"]])
    failed = sum(r["failed"] for r in doc["per_run"])
    if failed:
        lines += ["", (f"{failed} subject evaluations failed (see the runs' results.json); "
                   "they are left out.")]
    if doc["comparison"]:
        c = doc["comparison"]
        lines += ["", f"## Compared with `{c['other']}` (MeshNet-{c['other_channels']})", "",
                  (f"{c['paired_subjects']} subjects paired ({c['only_here']} only here, "
                   f"{c['only_there']} only there); {c['scores']}. Wilcoxon signed-rank test "
                   "(two-sided) per metric, Holm's correction over the metrics."), ""]
        lines += _table(["metric", "this: mean", "other: mean", "median difference", "W",
                         "p", "p (Holm)"],
                        [[LABELS[t["metric"]], _num(t["mean"]), _num(t["other_mean"]),
                          _num(t["median_difference"]), _num(t["statistic"], 1),
                          _num(t["p"], 4), _num(t["p_holm"], 4)] for t in c["tests"]])
    return "\n".join(lines) + "\n"


def write(out: str | os.PathLike, doc: dict) -> dict:
    """Write a report (:func:`build`) as ``report.json`` and ``report.md`` in ``out``,
    atomically."""
    files.write_json(Path(out) / REPORT_JSON, doc)
    files.write_bytes(Path(out) / REPORT_MD, markdown(doc).encode())
    return doc

#!/usr/bin/env python3
"""Turns scripts/results.sh's results.jsonl into docs/RESULTS.md's tables: per block, the mean and
spread over seeds of each (task, student, method, label noise), the number of seeds and the
command of each row, then every claim of issue 5 with the numbers that show it or do not.

Usage: scripts/results_table.py OUT_DIR/results.jsonl [--out docs/RESULTS.md] [--machine "..."]
"""
import argparse
import json
import statistics
import sys
from collections import defaultdict

TASKS = ["sst2", "cola", "mrpc", "rte"]
TASK_NAMES = {"sst2": "SST-2", "cola": "CoLA", "mrpc": "MRPC", "rte": "RTE"}
SMALL_TASKS = ["cola", "mrpc", "rte"]
BLOCKS = ["teachers", "core", "layers", "mate", "noise", "peer"]
BLOCK_TITLES = {
    "teachers": "Teachers: all-MiniLM-L6-v2 fine-tuned per task and seed",
    "core": "Core: paraphrase-MiniLM-L3-v2 from its checkpoint, each method",
    "layers": "Student = the teacher's layers 0,2,4",
    "mate": "MATE-KD (kd: the core block's rows)",
    "noise": "Label noise: teacher and student on the same flipped labels (clean kd: the core block's rows)",
    "peer": "Peer-advised KD: the teacher fine-tuned on 50 gold labels labels the training rows",
}
KEY = ("block", "task", "seed", "student", "method", "noise")


def load(path):
    """The record of each run: its last success, else its last error."""
    runs = {}
    for line in open(path):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        key = tuple(rec[k] for k in KEY)
        if "error" not in rec or key not in runs or "error" in runs[key]:
            runs[key] = rec
    return list(runs.values())


class Cell:
    """One (block, task, student, method, noise) over its seeds."""

    def __init__(self, recs):
        self.recs = sorted(recs, key=lambda r: r["seed"])
        self.metric = self.recs[0]["metric"]
        self.values = [r["value"] for r in self.recs if r.get("value") is not None]
        self.seeds = [r["seed"] for r in self.recs]
        self.patterns = sorted({r["pattern"] for r in self.recs})

    @property
    def mean(self):
        return statistics.mean(self.values) if self.values else None

    @property
    def std(self):
        return statistics.stdev(self.values) if len(self.values) > 1 else None

    def others(self):
        """The other metrics' means (MRPC: accuracy beside F1)."""
        names = sorted({k for r in self.recs for k in r["metrics"]} - {self.metric})
        out = []
        for name in names:
            vals = [r["metrics"][name] for r in self.recs if r["metrics"].get(name) is not None]
            if vals:
                out.append(f"{name} {fmt(statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else None)}")
        return ", ".join(out)


def fmt(mean, std):
    if mean is None:
        return "n/a"
    return f"{100 * mean:.2f}" + (f" ± {100 * std:.2f}" if std is not None else "")


def cell_text(c):
    return f"{c.metric} {fmt(c.mean, c.std)}" if c else "missing"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", help="results.jsonl written by scripts/results.sh")
    ap.add_argument("--out", help="write the markdown here instead of stdout")
    ap.add_argument("--machine", default="not stated", help="the machine the runs ran on, in words")
    args = ap.parse_args()
    recs = load(args.results)
    ok = [r for r in recs if "error" not in r and r.get("metric")]
    errors = [r for r in recs if "error" in r]

    groups = defaultdict(list)
    for r in ok:
        groups[(r["block"], r["task"], r["student"], r["method"], r["noise"])].append(r)
    cells = {k: Cell(v) for k, v in groups.items()}

    def get(block, task, student, method, noise=0.0):
        return cells.get((block, task, student, method, noise))

    lines = []
    w = lines.append
    devices = sorted({r["device"] for r in recs})
    w("# Results: the KD methods on GLUE (issue 5)")
    w("")
    w(f"Machine: {args.machine}; device `{', '.join(devices)}`. Produced by `scripts/results.sh OUT_DIR` "
      f"(every run's command below; `$OUT` is OUT_DIR, `{{seed}}` the seed) and tabulated by "
      f"`scripts/results_table.py OUT_DIR/results.jsonl`. {len(ok)} runs with a dev metric, "
      f"{len(errors)} failed; {sum(r['seconds'] for r in recs):.0f} s of wall time in all (process start, model "
      f"load, training and the final dev evaluation).")
    w("")
    dev = {t: sorted({r["examples"] for r in ok if r["task"] == t and r.get("split") == "dev"}) for t in TASKS}
    dev = ", ".join(f"{TASK_NAMES[t]} {'/'.join(map(str, n))}" for t, n in dev.items() if n)
    w(f"Numbers are dev-set scores × 100 (dev examples: {dev}), the mean ± sample standard deviation over "
      "the seeds (n). The metric: accuracy (SST-2, RTE), Matthews correlation (CoLA), F1 with accuracy beside it "
      "(MRPC). Each run is evaluated once, at its end (no best-on-dev checkpoint selection; noisy-coteach keeps "
      "the better of its two students on dev, as METHODS.md A.1 specifies). Teacher and student train on the same "
      "seeded subset of the training set (`--max-train`, drawn with `--seed`).")
    w("")

    w("## Claims")
    w("")
    for line in claims(cells):
        w(f"- {line}")
    w("")

    for block in BLOCKS + sorted({k[0] for k in cells} - set(BLOCKS)):
        keys = sorted((k for k in cells if k[0] == block),
                      key=lambda k: (TASKS.index(k[1]) if k[1] in TASKS else 9, k[4], k[3] != "teacher", k[2], k[3]))
        if not keys:
            continue
        w(f"## {BLOCK_TITLES.get(block, block)}")
        w("")
        w("| task | student | method | label noise | metric | mean ± std | n | other metrics | command |")
        w("|---|---|---|---:|---|---:|---:|---|---|")
        commands = []
        for k in keys:
            c = cells[k]
            refs = []
            for p in c.patterns:
                if p not in commands:
                    commands.append(p)
                refs.append(f"c{commands.index(p) + 1}")
            w(f"| {TASK_NAMES.get(k[1], k[1])} | {k[2]} | {k[3]} | {k[4]:g} | {c.metric} | {fmt(c.mean, c.std)} | "
              f"{len(c.values)} | {c.others()} | {', '.join(refs)} |")
        w("")
        for i, p in enumerate(commands):
            w(f"- c{i + 1}: `{p}`")
        w("")
        prep = [r for r in recs if r["block"] == block and "error" not in r and not r.get("metric")]
        for r in sorted(prep, key=lambda r: (r["task"], r["method"], r["noise"])):
            w(f"- {r['method']} ({TASK_NAMES.get(r['task'], r['task'])}, noise {r['noise']:g}): "
              f"`{r['pattern']}` -> `{json.dumps(summary(r.get('output', {})))}`")
        if prep:
            w("")

    w("## Wall time per block")
    w("")
    w("| block | runs | seconds |")
    w("|---|---:|---:|")
    for block in BLOCKS + sorted({r["block"] for r in recs} - set(BLOCKS)):
        done = [r for r in recs if r["block"] == block]
        if done:
            w(f"| {block} | {len(done)} | {sum(r['seconds'] for r in done):.0f} |")
    w("")

    if errors:
        w("## Failed runs")
        w("")
        for r in errors:
            w(f"- {r['block']} {r['task']} seed {r['seed']} {r['student']} {r['method']} noise {r['noise']:g}: "
              f"{r['error']}: `{r['pattern']}`")
            w("")
            w("  ```")
            for t in r.get("log_tail", "").splitlines()[-6:]:
                w(f"  {t}")
            w("  ```")
        w("")

    text = "\n".join(lines)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)


def summary(output):
    """A prep step's JSON result without its long fields."""
    return {k: v for k, v in output.items() if k not in ("source", "out", "flipped_file") and not isinstance(v, list)}


def compare(a, b):
    """`a` against `b` in points, marked as beyond or within the larger of the two spreads."""
    d = 100 * (a.mean - b.mean)
    spreads = [s for s in (a.std, b.std) if s is not None]
    spread = 100 * max(spreads) if spreads else None
    where = "" if spread is None else (" (beyond the spread)" if abs(d) > spread else " (within the spread)")
    return d, f"{d:+.2f}{where}"


def verdict(wins, total):
    if total == 0:
        return "not measured"
    if wins == total:
        return "**shown**"
    return "**partly shown**" if wins else "**not shown**"


def pairwise(title, tasks, a_of, b_of, better=lambda d: d > 0):
    """A claim 'a beats b' checked task by task; a_of/b_of(task) -> (label, Cell or None)."""
    parts, wins, total = [], 0, 0
    for t in tasks:
        (la, a), (lb, b) = a_of(t), b_of(t)
        if not (a and b and a.mean is not None and b.mean is not None):
            continue
        d, text = compare(a, b)
        total += 1
        wins += better(d)
        parts.append(f"{TASK_NAMES[t]} {text} [{la} {cell_text(a)}, {lb} {cell_text(b)}, n {len(a.values)}/{len(b.values)}]")
    return f"{title}: {verdict(wins, total)} on {wins} of {total} tasks. " + "; ".join(parts)


def claims(cells):
    def get(block, task, student, method, noise=0.0):
        return cells.get((block, task, student, method, noise))

    out = []
    core = lambda m: lambda t: (m, get("core", t, "L3", m))
    out.append(pairwise("KD beats CE (student MiniLM-L3)", TASKS, core("kd"), core("ce")))
    lay = lambda m: lambda t: (m, get("layers", t, "L6-024", m))
    out.append(pairwise("KD beats CE (student = teacher layers 0,2,4)", TASKS, lay("kd"), lay("ce")))
    out.append(pairwise("Last-layer ILD at least matches all-layer ILD on the small tasks", SMALL_TASKS,
                        core("ild-last"), core("ild"), better=lambda d: d >= 0))
    for other in ("ild", "ild-last"):
        out.append(pairwise(f"CR-ILD beats {other}", TASKS, core("cr-ild"), core(other)))
    out.append(pairwise("MATE-KD beats KD", TASKS, lambda t: ("mate-kd", get("mate", t, "L3", "mate-kd")),
                        core("kd")))
    rates = sorted({k[4] for k in cells if k[0] == "noise" and k[4] > 0})
    for t in TASKS:
        clean = get("core", t, "L3", "kd")
        if not rates or not any(get("noise", t, "L3", "kd", r) for r in rates):
            continue
        kds = [(0.0, clean)] + [(r, get("noise", t, "L3", "kd", r)) for r in rates]
        kds = [(r, c) for r, c in kds if c and c.mean is not None]
        falls = all(a[1].mean > b[1].mean for a, b in zip(kds, kds[1:]))
        out.append(f"{TASK_NAMES[t]}, plain kd falls as the noise grows: {'**shown**' if falls else '**not shown**'} ("
                   + ", ".join(f"r {r:g}: {cell_text(c)}" for r, c in kds) + ")")
        for m in ("noisy-coteach", "noisy-relabel"):
            for r in rates:
                noisy, fixed = get("noise", t, "L3", "kd", r), get("noise", t, "L3", m, r)
                if not (noisy and fixed and noisy.mean is not None and fixed.mean is not None):
                    continue
                d, text = compare(fixed, noisy)
                lost = clean.mean - noisy.mean if clean and clean.mean is not None else None
                share = (f", {100 * d / (100 * lost):.0f}% of the {100 * lost:.2f} points kd lost"
                         if lost and lost > 0 else ", kd lost nothing to recover" if lost is not None else "")
                gap = (f"; gap to clean kd {100 * (clean.mean - fixed.mean):+.2f}" if clean and clean.mean is not None
                       else "")
                shown = "**shown**" if d > 0 and (lost or 0) > 0 else "**not shown**"
                # Symmetric noise at r = (C-1)/C makes the label independent of the text.
                erased = " (at this rate the binary labels carry no information)" if r >= 0.5 else ""
                out.append(f"{TASK_NAMES[t]}, r {r:g}: {m} recovers part of what kd loses: {shown}: {text}{share}"
                           f" [{m} {cell_text(fixed)}, kd {cell_text(noisy)}, clean kd {cell_text(clean)}]{gap}{erased}")
    line = pairwise("Peer-advised beats plain KD on the labels of a teacher trained on 50 gold labels "
                    "(kd-alpha1: the teacher's outputs alone, no gold term)", TASKS,
                    lambda t: ("peer-advised", get("peer", t, "L3", "peer-advised")),
                    lambda t: ("kd-alpha1", get("peer", t, "L3", "kd-alpha1")))
    teachers = [f"{TASK_NAMES[t]} {cell_text(get('peer', t, 'L6', 'teacher'))}" for t in TASKS
                if get("peer", t, "L6", "teacher")]
    out.append(line + (f". The 50-label teachers: {', '.join(teachers)}" if teachers else ""))
    return out


if __name__ == "__main__":
    main()

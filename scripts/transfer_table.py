#!/usr/bin/env python3
"""Turns scripts/transfer.sh's OUT_DIR/results.jsonl into the markdown of docs/RESULTS.md's
"Transfer text" section: the majority baseline and the teacher on the held-out test set, the
teacher-quality gate, each method's test accuracy over seeds, and each method paired by seed
against its baseline: kd against ce; ild and cr-ild (same transfer text) against kd; kd-gold
against ce; the methods on the gold rows alone (kd-augment and mate-kd, which make their own
text, and the label-noise methods) against kd-gold.

A claim "A beats B by >= D points" is shown when the mean paired difference minus the paired
spread (the sample standard deviation of the per-seed differences) is at least D, over at least
5 seeds; A is behind B when the mean plus the spread is below 0.

Usage: scripts/transfer_table.py OUT_DIR
"""
import json
import statistics
import sys
from collections import Counter

out = sys.argv[1]
runs = [json.loads(line) for line in open(f"{out}/results.jsonl") if line.strip()]
test_labels = [l.split("\t")[-1] for l in open(f"{out}/data/test/dev.tsv").read().splitlines()[1:] if l.strip()]
majority = Counter(test_labels).most_common(1)[0][1] / len(test_labels)
teacher = next((r for r in runs if r["run"] == "teacher"), None)
by_method = {}
for r in runs:
    if r["run"] != "teacher":
        by_method.setdefault(r["method"], {})[r["seed"]] = r


def pct(x):
    return f"{100 * x:.2f}"


def paired(a, b):
    seeds = sorted(set(by_method.get(a, {})) & set(by_method.get(b, {})))
    diffs = [100 * (by_method[a][s]["test_accuracy"] - by_method[b][s]["test_accuracy"]) for s in seeds]
    return seeds, diffs


lines = [f"Held-out test set: {len(test_labels)} rows cut from SST-2's train file (never trained on, "
         f"never used for selection). Majority class: **{pct(majority)}%**."]
if teacher:
    lines.append(f"Teacher (all-MiniLM-L6-v2, best on dev): test **{pct(teacher['test_accuracy'])}%**, "
                 f"dev {pct(teacher['dev_accuracy'])}%, {teacher['train_seconds']:.0f} s to train.")
lines += ["", "| method | seeds | test accuracy % (mean ± sd) | dev % (mean) | train s (mean) |", "|---|---|---|---|---|"]
for method, rs in by_method.items():
    acc = [100 * r["test_accuracy"] for r in rs.values()]
    sd = statistics.stdev(acc) if len(acc) > 1 else float("nan")
    dev = statistics.mean(100 * r["dev_accuracy"] for r in rs.values())
    secs = statistics.mean(r["train_seconds"] for r in rs.values())
    lines.append(f"| {method} | {len(acc)} | {statistics.mean(acc):.2f} ± {sd:.2f} | {dev:.2f} | {secs:.0f} |")
if teacher and "ce" in by_method:
    ce = statistics.mean(r["test_accuracy"] for r in by_method["ce"].values())
    gap_ce, gap_major = 100 * (teacher["test_accuracy"] - ce), 100 * (teacher["test_accuracy"] - majority)
    ok = gap_ce >= 3 and gap_major >= 10
    lines += ["", f"Teacher-quality gate (>= 3 points over the ce student, >= 10 over the majority): "
                  f"{gap_ce:+.2f} and {gap_major:+.2f} points: **{'passed' if ok else 'failed'}**."]
lines += ["", "| claim | seeds | paired differences (points, by seed) | mean | spread (sd) | shown |", "|---|---|---|---|---|---|"]
GOLD_ONLY = ("kd-augment", "mate-kd", "slkd", "peer-advised", "noisy-relabel", "noisy-coteach")
BASELINE = {"kd-gold": "ce", **{m: "kd-gold" for m in GOLD_ONLY}}
claims = [("kd", "ce", 3.0)] + [(m, BASELINE.get(m, "kd"), 0.0) for m in by_method if m not in ("ce", "kd")]
# cr-ild is ild plus mixup, the consistency term and (in scripts/transfer.sh) a second stage-1 epoch.
claims.append(("cr-ild", "ild", 0.0))
for a, b, margin in claims:
    seeds, diffs = paired(a, b)
    if not diffs:
        continue
    mean = statistics.mean(diffs)
    sd = statistics.stdev(diffs) if len(diffs) > 1 else float("nan")
    if len(diffs) < 5:
        verdict = "not yet (fewer than 5 seeds)"
    elif mean - sd >= margin:
        verdict = "yes"
    else:
        verdict = "no: behind beyond the spread" if mean + sd < 0 else "no: within the spread"
    lines.append(f"| {a} beats {b} by >= {margin:g} | {len(diffs)} | {', '.join(f'{d:+.2f}' for d in diffs)} "
                 f"| {mean:+.2f} | {sd:.2f} | {verdict} |")
print("\n".join(lines))

#!/usr/bin/env python3
"""Checks that HF transformers loads a folder kd saved, and predicts what kd predicts.

Usage: python3 scripts/check_hf_load.py MODEL_DIR [TEXT ...]
Runs `kd-cli predict` (target/release/kd-cli, else `cargo run --release`) and
transformers' BertForSequenceClassification on the same texts, and compares the class
probabilities (max abs difference must be below 1e-4). Needs torch and transformers; without
them it says so and exits 2 (nothing was checked).
"""
import json
import os
import subprocess
import sys
import tempfile

def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__)
        return 2
    model_dir = sys.argv[1]
    texts = sys.argv[2:] or ["a gripping, beautifully made film", "tedious and far too long", "it is a movie"]
    try:
        import torch
        from transformers import AutoTokenizer, BertForSequenceClassification
    except ImportError as e:
        print(f"torch/transformers not installed ({e}): the transformers load was NOT checked")
        return 2

    model = BertForSequenceClassification.from_pretrained(model_dir, attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with torch.no_grad():
        enc = tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
        theirs = torch.softmax(model(**enc).logits.double(), dim=-1).tolist()

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    binary = os.path.join(root, "target", "release", "kd-cli")
    cmd = [binary] if os.path.exists(binary) else ["cargo", "run", "--quiet", "--release", "-p", "kd-cli", "--"]
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "texts.tsv")
        with open(data, "w") as f:
            f.write("sentence\n" + "".join(t.replace("\t", " ") + "\n" for t in texts))
        args = ["predict", "--model", model_dir, "--input", data, "--text-column", "sentence"]
        out = subprocess.run(cmd + args, check=True, capture_output=True, text=True).stdout
    ours = [json.loads(line)["probs"] for line in out.splitlines() if line.strip()]
    worst = max(abs(a - b) for r1, r2 in zip(ours, theirs) for a, b in zip(r1, r2))
    print(f"transformers loaded {model_dir}: {len(texts)} texts, max |p_kd - p_hf| = {worst:.2e}")
    return 0 if worst < 1e-4 else 1

if __name__ == "__main__":
    sys.exit(main())

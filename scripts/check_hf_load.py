#!/usr/bin/env python3
"""Checks that HF transformers loads a folder kd saved, and predicts what kd predicts.

Usage: python3 scripts/check_hf_load.py MODEL_DIR [TEXT ...]
Loads MODEL_DIR with transformers' AutoModelForSequenceClassification (the family's class from
config.json; every tensor must load: no missing, unexpected or mis-shaped ones), runs it and
`kd-cli predict` (`cargo run --release`, so the binary matches the source; the binary $KD_CLI
names instead, or target/release/kd-cli where cargo is absent) on the same
texts, and compares the class probabilities (max abs difference must be below 1e-4) and the
predicted label names (kd's against the saved config's id2label). Exits 0 when all holds, 1
when not. Needs torch and transformers; without them it says so and exits 2 (nothing was
checked).
"""
import json
import os
import shutil
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
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
    except ImportError as e:
        print(f"torch/transformers not installed ({e}): the transformers load was NOT checked")
        return 2

    model, info = AutoModelForSequenceClassification.from_pretrained(
        model_dir, attn_implementation="eager", output_loading_info=True
    )
    model.eval()
    not_loaded = {k: sorted(map(str, v)) for k, v in info.items() if v}
    if not_loaded:
        print(f"transformers did not load {model_dir} whole: {not_loaded}")
        return 1
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # RoBERTa spends pad_token_id + 1 position rows before the first token.
    offset = model.config.pad_token_id + 1 if model.config.model_type == "roberta" else 0
    max_len = min(128, model.config.max_position_embeddings - offset)
    with torch.no_grad():
        enc = tokenizer(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        theirs = torch.softmax(model(**enc).logits.double(), dim=-1).tolist()
    their_labels = [model.config.id2label[max(range(len(p)), key=p.__getitem__)] for p in theirs]

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    binary = os.path.join(root, "target", "release", "kd-cli")
    cmd = ["cargo", "run", "--quiet", "--release", "-p", "kd-cli", "--"] if shutil.which("cargo") else [binary]
    cmd = [os.environ["KD_CLI"]] if os.environ.get("KD_CLI") else cmd
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "texts.tsv")
        with open(data, "w") as f:
            f.write("sentence\n" + "".join(t.replace("\t", " ") + "\n" for t in texts))
        args = ["predict", "--model", model_dir, "--input", data, "--text-column", "sentence", "--max-len", str(max_len)]
        out = subprocess.run(cmd + args, check=True, capture_output=True, text=True, cwd=root).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.strip()]
    if len(rows) != len(texts) or any(len(r["probs"]) != len(p) for r, p in zip(rows, theirs)):
        print(f"kd-cli predict gave {len(rows)} rows for {len(texts)} texts, or other class counts")
        return 1
    worst = max(abs(a - b) for r, p in zip(rows, theirs) for a, b in zip(r["probs"], p))
    same_labels = [r["label"] for r in rows] == their_labels
    print(
        f"transformers loaded {model_dir} whole: {len(texts)} texts, max |p_kd - p_hf| = {worst:.2e}, "
        f"labels {'agree' if same_labels else 'DIFFER'} ({', '.join(their_labels)})"
    )
    return 0 if worst < 1e-4 and same_labels else 1

if __name__ == "__main__":
    sys.exit(main())

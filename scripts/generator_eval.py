#!/usr/bin/env python3
"""The PyTorch peer's measure of a generator's held-out masked-token accuracy: a folder that
`kd-cli train-generator` wrote, loaded by transformers' BertForMaskedLM, masked by transformers'
DataCollatorForLanguageModeling (BERT's 15% of tokens: 80% [MASK], 10% random, 10% kept, the
same scheme as kd's) under several seeds. Accuracy counts every selected token, as kd's does.

Usage: scripts/generator_eval.py GENERATOR_DIR HELD_OUT_TEXT [SEEDS (5)] [MAX_LEN (128)]
Prints one JSON line: per-seed accuracies, their mean and sd, and the masked-token count.
"""
import json
import statistics
import sys

import torch
from transformers import AutoTokenizer, BertForMaskedLM, DataCollatorForLanguageModeling

model_dir, text_file = sys.argv[1], sys.argv[2]
seeds = int(sys.argv[3]) if len(sys.argv) > 3 else 5
max_len = int(sys.argv[4]) if len(sys.argv) > 4 else 128
tokenizer = AutoTokenizer.from_pretrained(model_dir)
model = BertForMaskedLM.from_pretrained(model_dir).eval()
texts = [t for t in open(text_file, encoding="utf-8").read().splitlines() if t.strip()]
encoded = [tokenizer(*t.split("\t")[:2], truncation=True, max_length=max_len) for t in texts]
collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15)
accuracies, tokens = [], []
for seed in range(seeds):
    torch.manual_seed(seed)
    correct = total = 0
    with torch.no_grad():
        for start in range(0, len(encoded), 64):
            batch = collator([dict(e) for e in encoded[start:start + 64]])
            labels = batch.pop("labels")
            logits = model(**batch).logits
            selected = labels != -100
            correct += (logits.argmax(-1)[selected] == labels[selected]).sum().item()
            total += selected.sum().item()
    accuracies.append(correct / total)
    tokens.append(total)
print(json.dumps({"generator": model_dir, "texts": len(texts), "seeds": seeds, "accuracy": accuracies,
                  "mean": statistics.mean(accuracies), "sd": statistics.stdev(accuracies) if seeds > 1 else 0.0,
                  "masked_tokens": tokens}))

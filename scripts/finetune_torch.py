#!/usr/bin/env python3
"""The peer of `kd-cli finetune` for issue 3's recipe, in PyTorch + HF transformers.

A checkpoint (all-MiniLM-L6-v2 by default) with a fresh BertForSequenceClassification head,
fine-tuned on SST-2 (GLUE's TSV folder) with cross-entropy: a seeded --max-train subset of
train, AdamW (betas 0.9/0.999, eps 1e-8, weight decay except on biases and LayerNorm, as HF's
Trainer groups them), linear warm-up over ceil(warmup * steps) steps then linear decay to 0,
global-norm clipping, dropout from the model config, eager attention, dynamic padding per
batch, then accuracy on the full dev set (batches of --batch in file order).

What is the same as kd, exactly:
- The training rows: kd's `Dataset::subset` (crates/kd-methods/src/data.rs) is ported, with its
  generator (crates/kd-kernels/src/rng.rs: SplitMix64-seeded xoshiro256++, `below`, Fisher-Yates
  `shuffle`): all row indices shuffled with Rng(seed), the first N kept, in file order. Rows are
  read as kd reads GLUE TSV (BOM dropped, split on newlines and tabs, no quoting, empty lines
  skipped, header row first), so the same --seed trains on the same rows.
- The batches: the per-epoch order of trainer.rs, Rng(mix64(seed ^ (epoch + 1))).shuffle over
  the subset's positions, chunked by --batch, so both see the same examples in the same batches.
What is not (and cannot be): the new head's initial weights (kd draws them from its own
generator, here torch's normal(0, initializer_range) under torch.manual_seed(seed)), the dropout
masks, and float rounding; so runs of the two agree in distribution, not bit for bit.

With --teacher-logits FILE (a safetensors file whose `logits` [N, C] are a teacher's logits for
the --max-train rows in order: the cache `kd-cli distill --method kd` writes under
~/.cache/kd/teacher-logits) it is the peer of `kd-cli distill --method kd` instead: loss =
(1 - alpha) * CE + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)), batch mean.
Timing: `seconds` is the training loop (all epochs) only; `eval_seconds` is the final dev
evaluation. kd-cli's `seconds` spans its loop including the final dev evaluation and its
checkpoint writes, so compare it with seconds + eval_seconds.

Usage: python3 scripts/finetune_torch.py [--model DIR] [--data GLUE/SST-2] [--seed 42]
       [--max-train 4000] [--epochs 2] [--batch 32] [--lr 5e-5] [--max-len 64] [--warmup 0.1]
       [--weight-decay 0.01] [--max-grad-norm 1.0] [--threads 2] [--device cpu|cuda]
       [--teacher-logits FILE [--alpha 0.5] [--temperature 2.0]]
Progress goes to stderr; the last line of stdout is one JSON object: task, split, seed,
accuracy, examples (dev), train_examples, seconds, seconds_per_epoch, eval_seconds.
Needs torch and transformers; without them it says so on stderr and exits with status 3.
"""
import argparse
import json
import math
import os
import sys
import time

MISSING = 3
MASK = (1 << 64) - 1


def mix64(z):
    """SplitMix64 finaliser (rng.rs `mix64`)."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def _rotl(x, k):
    return ((x << k) | (x >> (64 - k))) & MASK


class Rng:
    """kd's sequential generator (rng.rs `Rng`): xoshiro256++ seeded through SplitMix64."""

    def __init__(self, seed):
        x = seed & MASK
        s = []
        for _ in range(4):
            x = (x + 0x9E3779B97F4A7C15) & MASK
            s.append(mix64(x))
        self.s = s

    def next_u64(self):
        s = self.s
        result = (_rotl((s[0] + s[3]) & MASK, 23) + s[0]) & MASK
        t = (s[1] << 17) & MASK
        s[2] ^= s[0]
        s[3] ^= s[1]
        s[1] ^= s[2]
        s[0] ^= s[3]
        s[2] ^= t
        s[3] = _rotl(s[3], 45)
        return result

    def below(self, n):
        """Uniform integer in [0, n) by the high half of a 64x64 product (Lemire, no rejection)."""
        return (self.next_u64() * n) >> 64

    def shuffle(self, items):
        for i in range(len(items) - 1, 0, -1):
            j = self.below(i + 1)
            items[i], items[j] = items[j], items[i]


def subset_indices(n_rows, n, seed):
    """The rows kd's `Dataset::subset(n, seed)` keeps, in file order (all of them if n >= n_rows)."""
    idx = list(range(n_rows))
    Rng(seed).shuffle(idx)
    return sorted(idx[:n])


def epoch_order(n, seed, epoch):
    """The trainer's order of the training set's positions in 0-based `epoch` (trainer.rs)."""
    order = list(range(n))
    Rng(mix64((seed ^ (epoch + 1)) & MASK)).shuffle(order)
    return order


def read_glue_tsv(path, text_column="sentence", label_column="label"):
    """(text, label) rows of a GLUE TSV file as kd's `load_table` reads it (header row first)."""
    with open(path, "rb") as f:
        data = f.read()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    records = []
    for lineno, line in enumerate(data.split(b"\n"), start=1):
        if line.endswith(b"\r"):
            line = line[:-1]
        if line:
            records.append((lineno, line.decode("utf-8").split("\t")))
    if not records:
        return []
    header = records[0][1]
    text_at, label_at = header.index(text_column), header.index(label_column)
    rows = []
    for lineno, fields in records[1:]:
        if len(fields) != len(header):
            raise SystemExit(f"{path}:{lineno}: {len(fields)} columns, expected {len(header)}")
        rows.append((fields[text_at], int(fields[label_at].strip())))
    return rows


def main():
    models = os.environ.get("KD_MODELS", os.path.expanduser("~/.cache/kd/models"))
    assets = os.environ.get("KD_ASSETS", os.path.join(os.path.dirname(__file__), "..", "..", "shared"))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=os.path.join(models, "all-MiniLM-L6-v2"))
    ap.add_argument("--data", default=os.path.join(assets, "data", "glue", "SST-2"), help="the SST-2 folder")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--max-train", type=int, default=4000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--warmup", type=float, default=0.1)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--teacher-logits", help="a teacher's logits for the training rows: distil instead of fine-tune")
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--temperature", type=float, default=2.0)
    args = ap.parse_args()

    try:
        import torch
        from transformers import AutoTokenizer, BertForSequenceClassification, get_linear_schedule_with_warmup
    except ImportError as e:
        print(f"torch/transformers not installed ({e}): not run", file=sys.stderr)
        return MISSING

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    train_rows = read_glue_tsv(os.path.join(args.data, "train.tsv"))
    dev_rows = read_glue_tsv(os.path.join(args.data, "dev.tsv"))
    train_rows = [train_rows[i] for i in subset_indices(len(train_rows), args.max_train, args.seed)]
    num_labels = max(label for _, label in train_rows) + 1

    tokenizer = AutoTokenizer.from_pretrained(args.model)

    def encode(rows):
        enc = tokenizer([t for t, _ in rows], truncation=True, max_length=args.max_len)
        return enc["input_ids"], [label for _, label in rows]

    def collate(ids, positions):
        seq = max(len(ids[i]) for i in positions)
        input_ids = torch.full((len(positions), seq), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(positions), seq), dtype=torch.long)
        for r, i in enumerate(positions):
            input_ids[r, : len(ids[i])] = torch.tensor(ids[i])
            mask[r, : len(ids[i])] = 1
        return input_ids, mask

    train_ids, train_labels = encode(train_rows)
    dev_ids, dev_labels = encode(dev_rows)
    teacher_logits = None
    if args.teacher_logits:
        from safetensors.torch import load_file

        teacher_logits = load_file(args.teacher_logits)["logits"].to(args.device)
        if teacher_logits.shape[0] != len(train_ids):
            raise SystemExit(f"{args.teacher_logits}: {teacher_logits.shape[0]} rows for {len(train_ids)} training rows")

    model = BertForSequenceClassification.from_pretrained(
        args.model, num_labels=num_labels, attn_implementation="eager"
    ).to(args.device)
    decay = [p for n, p in model.named_parameters() if not (n.endswith(".bias") or "LayerNorm" in n)]
    no_decay = [p for n, p in model.named_parameters() if n.endswith(".bias") or "LayerNorm" in n]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.999),
        eps=1e-8,
    )
    steps_per_epoch = math.ceil(len(train_ids) / args.batch)
    total_steps = steps_per_epoch * args.epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(args.warmup * total_steps), total_steps)

    log_every = max(total_steps // 10, 1)
    step = 0
    model.train()
    started = time.perf_counter()
    for epoch in range(args.epochs):
        order = epoch_order(len(train_ids), args.seed, epoch)
        for b in range(0, len(order), args.batch):
            positions = order[b : b + args.batch]
            input_ids, mask = collate(train_ids, positions)
            labels = torch.tensor([train_labels[i] for i in positions], device=args.device)
            input_ids, mask = input_ids.to(args.device), mask.to(args.device)
            out = model(input_ids=input_ids, attention_mask=mask, labels=labels)
            loss = out.loss
            if teacher_logits is not None:
                t, a = args.temperature, args.alpha
                soft = torch.nn.functional.kl_div(
                    torch.log_softmax(out.logits / t, dim=-1),
                    torch.softmax(teacher_logits[positions] / t, dim=-1),
                    reduction="batchmean",
                )
                loss = (1 - a) * loss + a * t * t * soft
            loss.backward()
            if args.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % log_every == 0 or step == total_steps:
                elapsed = time.perf_counter() - started
                print(f"step {step}/{total_steps} epoch {epoch + 1} loss {loss.item():.4f} {elapsed:.0f} s",
                      file=sys.stderr, flush=True)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started

    model.eval()
    t0 = time.perf_counter()
    correct = 0
    with torch.no_grad():
        for b in range(0, len(dev_ids), args.batch):
            positions = list(range(b, min(b + args.batch, len(dev_ids))))
            input_ids, mask = collate(dev_ids, positions)
            input_ids, mask = input_ids.to(args.device), mask.to(args.device)
            preds = model(input_ids=input_ids, attention_mask=mask).logits.argmax(dim=-1).tolist()
            correct += sum(int(p == dev_labels[i]) for p, i in zip(preds, positions))
    eval_seconds = time.perf_counter() - t0

    print(json.dumps({
        "task": "sst2",
        "split": "dev",
        "seed": args.seed,
        "accuracy": correct / len(dev_ids),
        "examples": len(dev_ids),
        "train_examples": len(train_ids),
        "seconds": round(seconds, 2),
        "seconds_per_epoch": round(seconds / args.epochs, 2),
        "eval_seconds": round(eval_seconds, 2),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""The peer of `kd-cli bench step`: the same standard distillation step in PyTorch + HF transformers.

A frozen teacher forward (eval mode, no grad), the student's forward and backward in train mode
(its config's dropout), loss 0.5 * CE + 0.5 * T^2 * KL(softmax(t/T) || softmax(s/T)) at T = 2 on a
2-class head, gradient clipping at norm 1 and an AdamW update (lr 5e-5, weight decay 0.01 except on
biases and LayerNorm weights, as HF's Trainer groups them); one fixed batch of random token ids
(seeded, special ids excluded), no padding.

PyTorch at its best on a GPU is bf16 autocast + SDPA + torch.compile (kd's `--precision bf16` peer):
  --precision bf16   runs both models' forwards (and the student's backward) under
                     torch.autocast(bfloat16); weights, gradients and AdamW stay fp32
  --attn sdpa        scaled_dot_product_attention (flash / memory-efficient kernels) instead of
                     the eager attention that materialises the maps
  --compile          torch.compile of both models (compile time is spent in the warm-up steps:
                     give --warmup 3 or more)

Usage: python3 scripts/bench_step_torch.py --teacher DIR --student DIR [--batch 32] [--seq 64]
       [--steps 10] [--warmup 1] [--device cpu|cuda] [--threads 2] [--seed 42]
       [--precision fp32|bf16] [--attn eager|sdpa] [--compile]
The last line of stdout is the JSON object kd-cli prints (same keys). Needs torch and transformers;
without them it says so on stderr and exits with status 3.
"""
import argparse
import json
import sys
import time

MISSING = 3


def peak_rss_mb():
    """VmHWM of /proc/self/status in MiB, as kd-cli reports it."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmHWM line in /proc/self/status")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--student", required=True)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--attn", choices=["eager", "sdpa"], default="eager")
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()

    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        print("torch not installed: PyTorch side not run", file=sys.stderr)
        return MISSING
    try:
        from transformers import AutoTokenizer, BertForSequenceClassification
    except ImportError:
        print("transformers not installed: PyTorch side not run", file=sys.stderr)
        return MISSING

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)

    def load(path):
        return BertForSequenceClassification.from_pretrained(path, num_labels=2, attn_implementation=args.attn).to(device)

    teacher = load(args.teacher).eval()
    teacher.requires_grad_(False)
    student = load(args.student).train()
    # The modules keep their parameters: the optimiser below sees the same tensors either way.
    run_teacher = torch.compile(teacher) if args.compile else teacher
    run_student = torch.compile(student) if args.compile else student
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    special = set(AutoTokenizer.from_pretrained(args.teacher).all_special_ids)
    special |= set(AutoTokenizer.from_pretrained(args.student).all_special_ids)
    allowed = torch.tensor([i for i in range(student.config.vocab_size) if i not in special])
    g = torch.Generator().manual_seed(args.seed)
    ids = allowed[torch.randint(len(allowed), (args.batch, args.seq), generator=g)].to(device)
    labels = torch.randint(2, (args.batch,), generator=g).to(device)
    mask = torch.ones_like(ids)
    types = torch.zeros_like(ids)

    no_decay = ("bias", "LayerNorm.weight")
    named = list(student.named_parameters())
    groups = [
        {"params": [p for n, p in named if not any(k in n for k in no_decay)], "weight_decay": 0.01},
        {"params": [p for n, p in named if any(k in n for k in no_decay)], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=5e-5, betas=(0.9, 0.999), eps=1e-8)
    temperature, alpha = 2.0, 0.5

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    phases = {k: 0.0 for k in ("teacher_forward", "student_forward", "loss", "backward", "optimizer")}

    def step(record):
        marks = [time.perf_counter()]

        def lap():
            sync()
            marks.append(time.perf_counter())

        with torch.no_grad(), autocast:
            t_logits = run_teacher(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        lap()
        with autocast:
            s_logits = run_student(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        lap()
        # The losses in fp32, as kd computes them (its softmax-KL accumulates in f32).
        t_logits, s_logits = t_logits.float(), s_logits.float()
        ce = F.cross_entropy(s_logits, labels)
        kl = F.kl_div(
            F.log_softmax(s_logits / temperature, dim=-1),
            F.log_softmax(t_logits / temperature, dim=-1),
            reduction="batchmean",
            log_target=True,
        )
        loss = (1 - alpha) * ce + alpha * temperature**2 * kl
        value = loss.item()
        lap()
        opt.zero_grad()
        loss.backward()
        lap()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        lap()
        if record:
            for name, (a, b) in zip(phases, zip(marks, marks[1:])):
                phases[name] += b - a
        return value, marks[-1] - marks[0]

    print(
        f"torch {torch.__version__}, {args.threads} threads, {device}: {args.batch} x {args.seq} tokens, "
        f"{args.precision}, attention {args.attn}{', compiled' if args.compile else ''}",
        file=sys.stderr,
    )
    for i in range(args.warmup):
        loss, seconds = step(False)
        print(f"warm-up {i + 1}/{args.warmup}: loss {loss:.4f}, {seconds:.3f} s", file=sys.stderr)
    started = time.perf_counter()
    for i in range(args.steps):
        loss, seconds = step(True)
        print(f"step {i + 1}/{args.steps}: loss {loss:.4f}, {seconds:.3f} s", file=sys.stderr)
    seconds_per_step = (time.perf_counter() - started) / args.steps
    result = {
        "seq_per_s": args.batch / seconds_per_step,
        "seconds_per_step": seconds_per_step,
        "peak_rss_mb": peak_rss_mb(),
        "batch": args.batch,
        "seq": args.seq,
        "steps": args.steps,
        "warmup": args.warmup,
        "device": str(device),
        "precision": args.precision,
        "attn": args.attn,
        "compile": args.compile,
        "phase_seconds": {k: v / args.steps for k, v in phases.items()},
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Writes the golden references of the encoder families kd reads besides BERT.

Usage: python3 scripts/make_family_goldens.py [OUT_DIR]   (default tests/assets/families)

For each family (roberta, distilbert, electra) it builds a tiny random
*ForSequenceClassification model with transformers (seeded; hidden 32, 2 layers, 4 heads;
ELECTRA with embedding_size 24 so its embeddings_project is used), and writes OUT_DIR/FAMILY/:
  config.json, model.safetensors   the HF folder, f32, as save_pretrained writes it
  tokenizer.json, tokenizer_config.json
                                   a word-level tokenizer over the words w5 .. w98 with the
                                   family's special tokens, so kd-cli and AutoTokenizer run
                                   the folder (texts like "w5 w17 w60")
  golden.safetensors               input_ids, attention_mask, labels (as f32), logits,
                                   hidden.I (every hidden state, embeddings first), loss and
                                   grad.NAME for every parameter NAME, of the mean
                                   cross-entropy of the logits against the labels
The references are computed in float64 from the f32 weights (exactly representable), in
eval mode (no dropout). Needs torch, transformers and safetensors.
"""
import os
import sys

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (DistilBertConfig, PreTrainedTokenizerFast, DistilBertForSequenceClassification, ElectraConfig,
                          ElectraForSequenceClassification, RobertaConfig,
                          RobertaForSequenceClassification)

VOCAB, HIDDEN, LAYERS, HEADS, FFN, POSITIONS, LABELS = 99, 32, 2, 4, 37, 40, 3
# Two rows, the second padded: padding must not leak into positions, attention or the head.
SEQ, REAL = 7, [7, 4]


def families():
    common = dict(vocab_size=VOCAB, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                  intermediate_size=FFN, hidden_act="gelu", num_labels=LABELS,
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    yield "roberta", 1, RobertaForSequenceClassification(RobertaConfig(
        hidden_size=HIDDEN, max_position_embeddings=POSITIONS, type_vocab_size=1,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, **common))
    yield "distilbert", 0, DistilBertForSequenceClassification(DistilBertConfig(
        vocab_size=VOCAB, dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS, hidden_dim=FFN,
        max_position_embeddings=POSITIONS, sinusoidal_pos_embds=False, activation="gelu",
        dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0, num_labels=LABELS,
        pad_token_id=0))
    yield "electra", 0, ElectraForSequenceClassification(ElectraConfig(
        hidden_size=HIDDEN, embedding_size=24, max_position_embeddings=POSITIONS,
        type_vocab_size=2, pad_token_id=0, **common))


# The special tokens at the family's ids (RoBERTa's <s> <pad> </s> <unk> <mask>, BERT's order
# for the others), then words.
SPECIALS = {1: ["<s>", "<pad>", "</s>", "<unk>", "<mask>"], 0: ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]}


def write_tokenizer(folder, pad):
    specials = SPECIALS[pad]
    vocab = {t: i for i, t in enumerate(specials + [f"w{i}" for i in range(len(specials), VOCAB)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=specials[3] if pad else specials[1]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if pad:
        tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
        names = dict(bos_token="<s>", eos_token="</s>", cls_token="<s>", sep_token="</s>", unk_token="<unk>", mask_token="<mask>")
    else:
        tok.post_processor = processors.BertProcessing(("[SEP]", 3), ("[CLS]", 2))
        names = dict(cls_token="[CLS]", sep_token="[SEP]", unk_token="[UNK]", mask_token="[MASK]")
    tok.enable_padding(pad_id=pad, pad_token=specials[pad])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=specials[pad], **names).save_pretrained(folder)


def inputs(pad):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, VOCAB, (len(REAL), SEQ), generator=g)
    mask = torch.zeros(len(REAL), SEQ, dtype=torch.long)
    for row, n in enumerate(REAL):
        mask[row, :n] = 1
        ids[row, n:] = pad
    labels = torch.tensor([2, 0])
    return ids, mask, labels


def write(out, name, pad, model):
    # HF's init is N(0, 0.02) with LayerNorm at 1 and 0: perturb every parameter so each
    # gradient is a sizeable, distinct number (and a wrong name or transpose shows).
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    folder = os.path.join(out, name)
    model.save_pretrained(folder, safe_serialization=True)
    write_tokenizer(folder, pad)
    model = model.double().eval()
    ids, mask, labels = inputs(pad)
    result = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    loss = torch.nn.functional.cross_entropy(result.logits, labels)
    loss.backward()
    golden = {"input_ids": ids.float(), "attention_mask": mask.float(), "labels": labels.float(),
              "logits": result.logits.detach(), "loss": loss.detach().reshape(1)}
    golden.update({f"hidden.{i}": h.detach() for i, h in enumerate(result.hidden_states)})
    golden.update({f"grad.{n}": p.grad for n, p in model.named_parameters()})
    # f32 on disk keeps the assets small; the tests' tolerances (1e-5, 1e-4) are far above it.
    save_file({k: v.float().contiguous() for k, v in golden.items()}, os.path.join(folder, "golden.safetensors"))
    print(f"{folder}: loss {loss.item():.6f}, {sum(p.numel() for p in model.parameters())} parameters")


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "tests/assets/families"
    torch.manual_seed(0)
    for name, pad, model in families():
        write(out, name, pad, model)


if __name__ == "__main__":
    main()

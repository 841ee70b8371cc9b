#!/usr/bin/env python3
"""Train the bundled tokenizer (``tokenizer.json``) and record the ids PyTorch users
would get (``expected/``), for ``memc data``'s tests.

Run from the repository root: ``python3 examples/data/make_tokenizer.py``

* ``tokenizer.json``: a byte-level BPE (GPT-2's pre-tokenizer and decoder) of 256
  tokens, ``<|endoftext|>`` (id 0) and ``<pad>`` (id 1) included, trained with Hugging
  Face's ``tokenizers`` on the texts of ``sample.txt`` and ``sft.jsonl`` (so every
  character they hold has an id; 256 tokens fit the example GPT-2's vocabulary).
* ``expected/``: what ``memc data`` must write, computed here with the Python
  ``tokenizers`` package and NumPy:
  - ``packed/``: ``sample.txt``, one document per line, each line's ids (no special
    tokens are added by this tokenizer) followed by ``<|endoftext|>``, concatenated and
    cut into rows of 32; the last partial row is padded with ``<pad>`` (labels -100,
    attention mask 0).
  - ``sft/``: ``sft.jsonl``, one row per record: the prompt's ids then the response's and
    ``<|endoftext|>``, truncated or padded to 32; labels -100 over the prompt and the
    padding, the ids elsewhere.
"""

import json
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

HERE = Path(__file__).resolve().parent
SEQ = 32
EOS, PAD = "<|endoftext|>", "<pad>"


def train():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=256, special_tokens=[EOS, PAD],
                                  show_progress=False)
    texts = (HERE / "sample.txt").read_text().splitlines()
    for line in (HERE / "sft.jsonl").read_text().splitlines():
        rec = json.loads(line)
        texts += [rec["prompt"], rec["response"]]
    tok.train_from_iterator(texts, trainer)
    assert tok.get_vocab_size() <= 256, tok.get_vocab_size()
    tok.save(str(HERE / "tokenizer.json"))
    return Tokenizer.from_file(str(HERE / "tokenizer.json"))


def rows_of(ids, labels):
    """Cut the streams into rows of SEQ, the last padded."""
    pad = TOK.token_to_id(PAD)
    out_ids, out_labels, out_mask = [], [], []
    for at in range(0, len(ids), SEQ):
        i, l = ids[at:at + SEQ], labels[at:at + SEQ]
        n = SEQ - len(i)
        out_ids.append(i + [pad] * n)
        out_labels.append(l + [-100] * n)
        out_mask.append([1] * len(i) + [0] * n)
    return out_ids, out_labels, out_mask


def save(d, ids, labels, mask):
    d.mkdir(parents=True, exist_ok=True)
    np.save(d / "input_ids.npy", np.array(ids, dtype=np.int64))
    np.save(d / "labels.npy", np.array(labels, dtype=np.int64))
    np.save(d / "attention_mask.npy", np.array(mask, dtype=np.int64))


TOK = train()


def main():
    eos, pad = TOK.token_to_id(EOS), TOK.token_to_id(PAD)
    stream = []
    for line in (HERE / "sample.txt").read_text().splitlines():
        if line.strip():
            stream += TOK.encode(line).ids + [eos]
    save(HERE / "expected" / "packed", *rows_of(stream, list(stream)))
    ids, labels, mask = [], [], []
    for line in (HERE / "sft.jsonl").read_text().splitlines():
        rec = json.loads(line)
        p = TOK.encode(rec["prompt"]).ids
        r = TOK.encode(rec["response"], add_special_tokens=False).ids + [eos]
        i, l = (p + r)[:SEQ], ([-100] * len(p) + r)[:SEQ]
        n = SEQ - len(i)
        ids.append(i + [pad] * n)
        labels.append(l + [-100] * n)
        mask.append([1] * len(i) + [0] * n)
    save(HERE / "expected" / "sft", ids, labels, mask)
    print(f"vocab {TOK.get_vocab_size()}, packed rows {len(stream) // SEQ + 1}, sft rows {len(ids)}")


if __name__ == "__main__":
    main()

"""Reference points for scripts/transformer_lm.py: n-gram language models on the same token streams.

The Transformer's test perplexity means little alone. These are the classic baselines of word-level language
modelling, fitted on the same training stream (Multi30k's English captions in the seq2seq script's tokens, each
sentence ending in <eos>) and scored per token on the same test stream: a unigram (frequencies alone), and
interpolated Kneser-Ney bigram and trigram models (Chen & Goodman 1998, absolute discount 0.75), each token
predicted from its full preceding context in the stream as the Transformer sees up to 31 tokens of it.

    python -m bench.lm_baselines --data_dir DATA_DIR
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import Counter, defaultdict
from types import SimpleNamespace

D = 0.75  # the absolute discount of interpolated Kneser-Ney


def streams(data_dir: str) -> tuple[list[int], list[int], int]:
    """(train tokens, test tokens, vocabulary size) exactly as scripts/transformer_lm.py reads them."""
    from shared.text import load_multi30k

    cfg = SimpleNamespace(data=data_dir and "auto", data_dir=data_dir, limit_train=0, limit_eval=0)
    pairs = load_multi30k(cfg)
    flat = [int(t) for ids in pairs.train["trg"] for t in ids[1:]]  # drop <sos>: each sentence ends in <eos>
    test = [int(t) for ids in pairs.test["trg"] for t in ids[1:]]
    return flat, test, len(pairs.info["trg_vocab"])


class KneserNey:
    """Interpolated Kneser-Ney of order 2 or 3: the highest order from counts, lower orders from continuation
    counts (how many distinct words precede a word), every order discounted by D and backed off."""

    def __init__(self, tokens: list[int], vocab: int, order: int):
        self.order, self.vocab = order, vocab
        self.counts = [Counter() for _ in range(order + 1)]  # counts[n][ngram]: n-grams of length n
        for n in range(1, order + 1):
            self.counts[n].update(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
        # continuation counts for the lower orders: distinct left contexts of each (n)-gram
        self.cont = [Counter() for _ in range(order)]
        for n in range(1, order):
            for gram in self.counts[n + 1]:
                self.cont[n][gram[1:]] += 1
        self.totals, self.types = defaultdict(Counter), defaultdict(Counter)  # per order, per context
        for n in range(1, order + 1):
            table = self.counts[n] if n == order else self.cont[n]
            for gram, c in table.items():
                self.totals[n][gram[:-1]] += c
                self.types[n][gram[:-1]] += 1

    def prob(self, context: tuple[int, ...], word: int) -> float:
        p = 1.0 / self.vocab  # order 0: uniform
        for n in range(1, self.order + 1):
            ctx = context[len(context) - (n - 1) :] if n > 1 else ()
            if len(ctx) < n - 1:
                continue
            table = self.counts[n] if n == self.order else self.cont[n]
            total = self.totals[n][ctx]
            if total == 0:
                continue  # an unseen context: keep the lower order
            c = table[(*ctx, word)]
            p = max(c - D, 0.0) / total + D * self.types[n][ctx] / total * p
        return p

    def perplexity(self, tokens: list[int]) -> float:
        nll = 0.0
        for i, w in enumerate(tokens):
            nll -= math.log(self.prob(tuple(tokens[max(0, i - self.order + 1) : i]), w))
        return math.exp(nll / len(tokens))


def unigram_perplexity(train: list[int], test: list[int], vocab: int) -> float:
    """Add-one smoothed frequencies."""
    counts, n = Counter(train), len(train)
    return math.exp(-sum(math.log((counts[w] + 1) / (n + vocab)) for w in test) / len(test))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data_dir", default="data")
    args = ap.parse_args(argv)
    try:
        train, test, vocab = streams(args.data_dir)
    except Exception as e:  # no Multi30k under --data_dir: one line
        print(f"error: {e} (--data_dir {args.data_dir}; make data)", file=sys.stderr)
        return 2
    print(
        f"Multi30k English, {len(train):,} training tokens, {len(test):,} test tokens, vocabulary {vocab:,}"
    )
    print(f"unigram (add-one): test perplexity {unigram_perplexity(train, test, vocab):.1f}")
    for order in (2, 3):
        print(
            f"Kneser-Ney {order}-gram: test perplexity {KneserNey(train, vocab, order).perplexity(test):.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

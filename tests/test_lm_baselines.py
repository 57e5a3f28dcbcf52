"""bench/lm_baselines.py, the Transformer LM's reference points: a language model is a distribution."""

import pytest

from bench.lm_baselines import KneserNey, unigram_perplexity


@pytest.mark.parametrize("order", [2, 3])
def test_kneser_ney_sums_to_one_in_every_context(order):
    tokens = [0, 1, 2, 0, 1, 3, 0, 2, 2, 1, 0, 1, 2, 4, 0]
    lm = KneserNey(tokens, vocab=6, order=order)  # word 5 never seen
    for context in [(0,), (0, 1), (2, 2), (5,), (5, 5), (), (1, 5)]:
        total = sum(lm.prob(context, w) for w in range(6))
        assert total == pytest.approx(1.0, abs=1e-12), context
    assert lm.prob((0,), 1) > lm.prob((0,), 4) > 0  # "0 1" seen three times, "0 4" never
    assert lm.perplexity(tokens) < unigram_perplexity(tokens, tokens, 6)  # context helps on its own data

import math

import torch

from patchsparse.evaluate.perplexity import evaluate_perplexity, window_nll


class FixedLogits(torch.nn.Module):
    """A fake LM whose logits are given: lets the perplexity formula be checked by hand."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, use_cache=False):
        class Out:  # noqa: D401 - minimal stand-in for a ModelOutput
            pass

        out = Out()
        out.logits = self.logits[: input_ids.shape[0]]
        return out


def test_window_nll_hand_computed():
    # vocab 2, window [0, 1, 1]: positions predict 1 from logits[0] and 1 from logits[1]
    logits = torch.tensor([[[0.0, 0.0], [0.0, math.log(3.0)], [5.0, 5.0]]])
    window = torch.tensor([[0, 1, 1]])
    # -log(1/2) - log(3/4); the last position predicts nothing
    expected = math.log(2) + math.log(4 / 3)
    assert torch.allclose(window_nll(logits, window), torch.tensor([expected]), atol=1e-6)


def test_perplexity_averages_over_all_predicted_tokens():
    # window 0 predicts with p=1/2 twice, window 1 with p=1/4 twice (vocab 4, uniform logits
    # except where a token is made 3x likelier).
    uniform2 = torch.tensor([0.0, 0.0, -1e9, -1e9])
    uniform4 = torch.zeros(4)
    logits = torch.stack([torch.stack([uniform2] * 3), torch.stack([uniform4] * 3)])  # (2, 3, 4)
    windows = torch.tensor([[0, 1, 0], [2, 3, 1]])
    result = evaluate_perplexity(FixedLogits(logits), windows, batch_size=2)
    mean_nll = (2 * math.log(2) + 2 * math.log(4)) / 4  # not the mean of per-window perplexities
    assert result.tokens_scored == 4
    assert math.isclose(result.perplexity, math.exp(mean_nll), rel_tol=1e-6)
    assert result.windows == 2 and result.seqlen == 3


def test_batch_size_does_not_change_result(tiny_model):
    windows = torch.randint(0, tiny_model.config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(0))
    a = evaluate_perplexity(tiny_model, windows, batch_size=1)
    b = evaluate_perplexity(tiny_model, windows, batch_size=3)
    assert math.isclose(a.perplexity, b.perplexity, rel_tol=1e-5)
    # a random model is near-uniform: perplexity close to the vocabulary size
    assert 0.5 * tiny_model.config.vocab_size < a.perplexity < 2 * tiny_model.config.vocab_size

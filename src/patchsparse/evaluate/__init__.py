"""Evaluation: perplexity (and zero-shot tasks through lm-evaluation-harness)."""

from patchsparse.evaluate.perplexity import PerplexityResult, evaluate_perplexity, perplexity_from_nll

__all__ = ["PerplexityResult", "evaluate_perplexity", "perplexity_from_nll"]

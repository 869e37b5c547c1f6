"""Text corpora and token windows (calibration / training / evaluation, disjoint)."""

from patchsparse.data.corpus import Corpus, load_corpus
from patchsparse.data.windows import random_windows, sequential_windows, tokenize_texts

__all__ = ["Corpus", "load_corpus", "random_windows", "sequential_windows", "tokenize_texts"]

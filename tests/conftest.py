"""Shared fixtures: a tiny random Llama built in code (no downloads) and its tokenizer."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("PATCHSPARSE_NO_PROGRESS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

TINY_TEXT = (
    "Sparse models keep a fraction of their weights. Tiles of a matrix can be dense or sparse.\n\n"
    "A two out of four pattern keeps two weights in every group of four consecutive inputs.\n\n"
    "Learned masks choose which weights to keep, and a regulariser sets the overall density.\n\n"
) * 20


def build_tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TINY_TEXT], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")


def build_tiny_llama(vocab_size: int, seed: int = 0, hidden: int = 64, intermediate: int = 128,
                     layers: int = 2, max_positions: int = 256):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=max_positions, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    model.requires_grad_(False)
    return model


WORDS = "sparse dense tile mask weight group pattern layer model keeps learns two four of the a".split()


def write_random_paragraphs(path, count: int, seed: int = 0):
    """`count` distinct paragraphs of 40 random words (so the held-out split does not swallow the
    training text, as the repeated TINY_TEXT does). -> path"""
    import random

    rng = random.Random(seed)
    path.write_text("\n\n".join(" ".join(rng.choice(WORDS) for _ in range(40)) + f" {i}." for i in range(count)))
    return path


@pytest.fixture()
def one_thread():
    """The tiny model's matrices are too small to share: a second thread only waits (badly so on a
    busy machine). Restored after each test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture()
def tiny_model(tiny_tokenizer):
    return build_tiny_llama(len(tiny_tokenizer))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A local Hugging Face model directory holding the tiny Llama and its tokenizer."""
    path = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_llama(len(tiny_tokenizer)).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "tiny.txt"
    path.write_text(TINY_TEXT)
    return path


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

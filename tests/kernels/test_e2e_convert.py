"""The default model converted to hybrid layers generates what the masked dense model generates."""

import copy

import pytest
import torch

from patchsparse.kernels import DenseLinear, HybridLinear, convert_model, synthetic_spec
from patchsparse.models import LayerSelection, load_model, select_linears

pytestmark = pytest.mark.e2e


def test_default_model_converted_generates_the_same_tokens():
    loaded = load_model("smollm2-135m", dtype="float32", device="cpu")
    model = loaded.model
    # the first 8 of 30 blocks keep the test short; every projection shape of the model is among them
    spec = synthetic_spec(select_linears(model, LayerSelection(include=(r"\.layers\.[0-7]\.",))), 0.45, (128, 128))
    masked = copy.deepcopy(model)
    spec.apply_(masked)
    convert_model(model, spec)          # auto: the CPU kernel, or dense where it was measured slower
    assert sum(isinstance(m, (HybridLinear, DenseLinear)) for m in model.modules()) == 8 * 7
    ids = loaded.tokenizer("Sparse matrices are", return_tensors="pt").input_ids
    with torch.no_grad():
        kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=loaded.tokenizer.eos_token_id)
        assert model.generate(ids, **kwargs).tolist() == masked.generate(ids, **kwargs).tolist()

"""The GPU paths on the CPU: the GPU primitives replaced by dense stand-ins that check what they get.

`torch._cslt_compress` / `torch._cslt_sparse_mm` become dense products that assert the layouts
cuSPARSELt needs (2:4 pattern, padded shapes, contiguous operands, the dense operand as the
transpose of a whole row-major matrix); the device checks see an sm90 GPU. So dispatch, shapes,
strides, fallbacks, buffers and the split GEMM's temporaries are checked without a GPU.
"""

import io
import sys
import types

import pytest
import torch
import torch.nn as nn

from patchsparse.errors import PatchsparseError
from patchsparse.kernels import HybridLinear, convert_model, synthetic_layer_mask, synthetic_spec
from patchsparse.kernels import bench, split
from patchsparse.kernels import linear as linear_mod
from patchsparse.kernels.split import compress_24, expand_24, semi_structured_backend, semi_structured_supported
from patchsparse.models import select_linears


class FakeCuSparseLt:
    """Dense stand-ins for torch's cuSPARSELt ops; they assert the layouts they receive."""

    def __init__(self):
        self.compressed = []   # shapes compressed
        self.products = []     # (compressed shape, dense shape, dense strides)

    def compress(self, w):
        assert w.dim() == 2 and w.is_contiguous() and w.dtype in (torch.float16, torch.bfloat16)
        assert w.shape[0] % 64 == 0 and w.shape[1] % 64 == 0, w.shape
        assert int((w.reshape(w.shape[0], -1, 4) != 0).sum(-1).max()) <= 2, "not 2:4"
        self.compressed.append(tuple(w.shape))
        return w.clone()

    def sparse_mm(self, compressed, dense, bias=None, alpha=None, out_dtype=None, transpose_result=False,
                  alg_id=0, split_k=1, split_k_mode=-1):
        k, m = dense.shape
        assert k == compressed.shape[1] and m % 8 == 0 and dense.dtype == compressed.dtype
        assert dense.stride() == (1, k), f"dense operand strides {dense.stride()}, want (1, {k})"
        self.products.append((tuple(compressed.shape), tuple(dense.shape), dense.stride()))
        y = (compressed.float() @ dense.float()).to(compressed.dtype)          # (out, m)
        return y.t().contiguous() if transpose_result else y


@pytest.fixture
def fake_gpu(monkeypatch):
    """An sm90 GPU with cuSPARSELt, whose 2:4 ops run densely on the CPU tensors given to them."""
    fake = FakeCuSparseLt()
    monkeypatch.setattr(split, "_cuda_capability", lambda device: (9, 0))
    monkeypatch.setattr(torch.backends.cusparselt, "is_available", lambda: True)
    monkeypatch.setattr(torch, "_cslt_compress", fake.compress)
    monkeypatch.setattr(torch, "_cslt_sparse_mm", fake.sparse_mm)
    return fake


def masked(linear, mask):
    return (linear.weight * mask.keep_mask()).float()


def check_close(got, x, weight, bias=None):
    expected = x.float() @ weight.T + (0 if bias is None else bias.float())
    scale = expected.abs().max().item()
    assert (got.float() - expected).abs().max().item() < 2e-2 * scale


# -- item 2: what the device really has -------------------------------------------------------------
def test_sm90_without_cusparselt_has_no_24_gemm(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.backends.cusparselt, "is_available", lambda: False)
    cuda = torch.device("cuda")
    assert not semi_structured_supported(cuda, torch.bfloat16)
    assert "cuSPARSELt" in semi_structured_backend(cuda, torch.bfloat16)[1]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    assert semi_structured_backend(cuda, torch.bfloat16)[0] == "cutlass"    # sm8x: CUTLASS without it
    monkeypatch.setattr(torch.backends.cusparselt, "is_available", lambda: True)
    assert semi_structured_backend(cuda, torch.float16)[0] == "cusparselt"
    assert semi_structured_backend(cuda, torch.float32)[0] is None         # no fp32 2:4 GEMM


@pytest.mark.parametrize("backend", ["split", "stripe"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_24_path_is_taken_with_padded_shapes(fake_gpu, backend, dtype):
    torch.manual_seed(0)
    linear = nn.Linear(576, 100, bias=True).to(dtype)                 # ragged: 100 rows padded to 128
    mask = synthetic_layer_mask(linear.weight, 0.35, (32, 576) if backend == "stripe" else (32, 64))
    hybrid = HybridLinear.from_dense(linear, mask, backend=backend)
    assert hybrid.kernel_path == f"{backend}/cusparselt" and hybrid.packed.sparse_part.accelerated
    n_rows = hybrid.packed.sparse_part.out_features
    assert fake_gpu.compressed == [(-(-n_rows // 64) * 64, 576)]
    for tokens in (1, 5, 33, 130):                                      # tokens padded to 8 for the GEMM
        x = torch.randn(tokens, 576).to(dtype)
        check_close(hybrid(x), x, masked(linear, mask), linear.bias)
    assert {shape[1] % 8 for _, shape, _ in fake_gpu.products} == {0}


# -- item 4: non-contiguous inputs --------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["split", "stripe"])
def test_sliced_input_reaches_the_24_gemm_contiguous(fake_gpu, backend):
    torch.manual_seed(1)
    linear = nn.Linear(128, 64, bias=False).to(torch.bfloat16)
    mask = synthetic_layer_mask(linear.weight, 0.35, (16, 128) if backend == "stripe" else (16, 32))
    hybrid = HybridLinear.from_dense(linear, mask, backend=backend)
    wide = torch.randn(16, 384).to(torch.bfloat16)
    for x in (wide[:, 64:192], wide[:, ::3], wide.t()[:128].t()):    # offset slice, stride 3, transposed
        assert not x.is_contiguous()
        check_close(hybrid(x), x, masked(linear, mask))
    assert fake_gpu.products                                            # the 2:4 GEMM really ran


# -- item 1: split's batched GEMM sums each tile row; bounded temporaries ---------------------------
def test_split_remainder_temporaries_are_bounded(monkeypatch):
    torch.manual_seed(2)
    out_f, in_f, tokens, r = 250, 512, 300, 32
    linear = nn.Linear(in_f, out_f, bias=False)
    mask = synthetic_layer_mask(linear.weight, 0.25, (r, 32))          # half of the tiles dense
    hybrid = HybridLinear.from_dense(linear, mask, backend="split")
    budget = 64 << 10
    monkeypatch.setattr(split, "SPLIT_GATHER_BYTES", budget, raising=False)
    calls = []
    real_bmm = torch.bmm

    def recording_bmm(a, b, *args, **kwargs):
        out = real_bmm(a, b, *args, **kwargs)
        calls.append((a.numel(), b.numel(), out.numel()))
        return out

    monkeypatch.setattr(torch, "bmm", recording_bmm)
    x = torch.randn(tokens, in_f)
    torch.testing.assert_close(hybrid(x), x @ masked(linear, mask).T, rtol=1e-4, atol=1e-4)
    padded_out = -(-out_f // r) * r
    assert calls and sum(result for *_, result in calls) <= tokens * padded_out    # results: output-sized
    assert len(calls) > 1                                                             # token chunks
    assert all(gathered * 4 <= budget for _, gathered, _ in calls)                   # gathered inputs bounded


def test_split_rows_with_different_dense_counts():
    """Tile rows hold 0, 1 and 3 dense tiles: K is padded to the longest, the padding reads zero."""
    torch.manual_seed(3)
    linear = nn.Linear(64, 24, bias=False)                            # tiles (8, 16): 3 x 4 grid
    base = synthetic_layer_mask(linear.weight, 0.5, (8, 16))
    dense_tiles = torch.tensor([[False, False, False, False], [False, True, False, False],
                                [True, False, True, True]])
    mask = type(base)(base.sparse_keep, "2:4", (8, 16), dense_tiles)
    hybrid = HybridLinear.from_dense(linear, mask, backend="split")
    packed = hybrid.packed
    assert tuple(packed.row_values.shape) == (2, 8, 3 * 8)            # rows 1 and 2; 3 tiles x 8 values
    assert packed.row_rows[:, 0].tolist() == [8, 16]
    assert packed.row_cols[0, 8:].eq(64).all()                         # padding column in the short row
    assert packed.row_cols[1, :4].tolist() == [2, 3, 6, 7]            # positions 2,3 of tile column 0
    torch.testing.assert_close(hybrid.dense_weight(), masked(linear, mask), rtol=0, atol=0)
    x = torch.randn(7, 64)
    torch.testing.assert_close(hybrid(x), x @ masked(linear, mask).T, rtol=1e-5, atol=1e-5)


def test_compress_24_by_hand():
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]])
    keep = torch.tensor([[1, 0, 1, 0, 0, 0, 1, 1]], dtype=torch.bool)
    values, positions = compress_24(w, keep)
    assert values.tolist() == [[1.0, 3.0, 7.0, 8.0]]
    assert positions.tolist() == [[0 | 2 << 2, 2 | 3 << 2]]
    assert expand_24(values, positions).tolist() == [[1.0, 0.0, 3.0, 0.0, 0.0, 0.0, 7.0, 8.0]]


# -- item 2: fallbacks are announced, refused off the CPU, and recorded ------------------------------
def test_cpu_layer_moved_off_the_cpu_says_so(capfd):
    linear = nn.Linear(64, 32)
    hybrid = HybridLinear.from_dense(linear, synthetic_layer_mask(linear.weight, 0.45, (16, 16)), backend="cpu")
    capfd.readouterr()
    hybrid.to("meta")                                                  # as model.cuda() after conversion
    assert hybrid.kernel_path == "expand-fallback"
    assert "WARNING" in capfd.readouterr().err


@pytest.mark.parametrize("backend", ["cpu", "split", "stripe", "triton"])
def test_explicit_backend_without_its_kernel_is_refused_off_the_cpu(monkeypatch, backend):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    linear = nn.Linear(64, 32, device="meta", dtype=torch.float16)
    mask = synthetic_layer_mask(torch.randn(32, 64), 0.45, (16, 64) if backend == "stripe" else (16, 16))
    with pytest.raises(PatchsparseError, match=f"backend '{backend}' cannot run its kernel"):
        HybridLinear.from_dense(linear, mask, backend=backend)


def test_triton_without_triton_is_an_announced_fallback(monkeypatch, capfd):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    linear = nn.Linear(64, 32)
    mask = synthetic_layer_mask(linear.weight, 0.45, (16, 16))
    hybrid = HybridLinear.from_dense(linear, mask, backend="triton")
    assert hybrid.kernel_path == "expand-fallback"
    linear_mod._warned.clear()
    HybridLinear.from_dense(linear, mask, backend="triton")
    assert "WARNING: 'triton' layers on cpu rebuild the full weight" in capfd.readouterr().err
    x = torch.randn(3, 64)
    torch.testing.assert_close(hybrid(x), x @ masked(linear, mask).T + linear.bias, rtol=1e-5, atol=1e-5)


def test_emulated_split_is_recorded(capfd):
    linear_mod._warned.clear()
    linear = nn.Linear(64, 32)
    hybrid = HybridLinear.from_dense(linear, synthetic_layer_mask(linear.weight, 0.45, (16, 16)), backend="split")
    assert hybrid.kernel_path == "split/emulated" and not hybrid.packed.sparse_part.accelerated
    assert "multiply the 2:4 part densely" in capfd.readouterr().err


def test_benchmark_rows_show_paths_and_the_fastest():
    cell = bench.Cell((64, 64), 1, dense_seconds=2.0, hybrid_seconds={"25% split": 1.0, "25% triton": 4.0},
                      paths={"25% split": "split/cusparselt", "25% triton": "triton/split-k=8"})
    assert cell.fastest() == "25% split"
    row = bench.format_table([cell]).splitlines()[-1]
    assert "25% split" in row.split("x")[-1] and "split/cusparselt, triton/split-k=8" in row
    assert bench.Cell((64, 64), 1, 1.0, {"a": 2.0}).fastest() == "dense"
    cells, _ = bench.layer_benchmark([(32, 64)], [1], [0.25], torch.float32, torch.device("cpu"), ["reference"],
                                     (16, 16), rounds=1, budget=1e-4)
    assert cells[0].paths == {"25%": "reference"}


# -- item 3 and 6: Triton launch: IEEE fp32, split-K for few tokens ----------------------------------
@pytest.fixture
def fake_triton(monkeypatch):
    """A stand-in Triton kernel that records its launches and computes the product densely."""
    launches = []

    class Kernel:
        def __getitem__(self, grid):
            def launch(x, y, *args, **meta):
                assert x.is_contiguous() and x.stride(0) == args[-3]
                launches.append((grid, meta, y.dtype, bool((y == 0).all())))
                y.copy_(x.float() @ launches_weight[0].T.float())
            return launch

    launches_weight = []
    monkeypatch.setitem(sys.modules, "triton", types.SimpleNamespace(cdiv=lambda a, b: -(-a // b)))
    module = types.ModuleType("patchsparse.kernels.triton_kernel")
    module.hybrid_tile_kernel = Kernel()
    monkeypatch.setitem(sys.modules, "patchsparse.kernels.triton_kernel", module)
    monkeypatch.setattr(linear_mod, "triton_available", lambda device=None: True)
    return launches, launches_weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_launch_precision_and_split_k(fake_triton, dtype):
    launches, weight = fake_triton
    linear = nn.Linear(256, 128, bias=False).to(dtype)                 # 2 row blocks x 4 k-blocks
    mask = synthetic_layer_mask(linear.weight, 0.45, (64, 64))
    hybrid = HybridLinear.from_dense(linear, mask, backend="triton")
    weight.append(hybrid.dense_weight())
    assert hybrid.kernel_path_for(1) == "triton/split-k=4" and hybrid.kernel_path_for(16384) == "triton/split-k=1"
    x = torch.randn(40, 512).to(dtype)[:, ::2]
    check_close(hybrid(x), x, masked(linear, mask).float())
    (grid, meta, y_dtype, zeroed), = launches
    assert meta["IEEE"] == (dtype == torch.float32)                    # no TF32 against an fp32 baseline
    assert grid == (2, 1, 4) and meta["SPLIT_K"] == 4 and meta["BLOCK_M"] == 64
    assert y_dtype == torch.float32 and zeroed                          # split-K adds into zeroed fp32
    hybrid(torch.randn(16384, 256).to(dtype))
    assert launches[-1][1]["SPLIT_K"] == 1 and launches[-1][2] == dtype


# -- item 5: packed tensors are buffers ------------------------------------------------------------
@pytest.mark.parametrize("backend", ["cpu", "reference", "split", "stripe", "triton"])
def test_state_dict_round_trip(backend):
    torch.manual_seed(4)
    tile = (16, 64) if backend == "stripe" else (16, 16)
    source, other = nn.Linear(64, 48), nn.Linear(64, 48)
    mask = synthetic_layer_mask(source.weight, 0.45, tile)
    saved = HybridLinear.from_dense(source, mask, backend=backend)
    state = saved.state_dict()
    assert any(k.startswith("packed_") for k in state) and "bias" in state
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = HybridLinear.from_dense(other, mask, backend=backend)   # same mask, other weights
    loaded.load_state_dict(torch.load(buffer))
    x = torch.randn(5, 64)
    torch.testing.assert_close(loaded(x), saved(x), rtol=0, atol=0)
    torch.testing.assert_close(loaded.dense_weight(), masked(source, mask), rtol=0, atol=0)


def test_loading_recompresses_the_24_operand(fake_gpu):
    torch.manual_seed(5)
    source, other = nn.Linear(128, 64).to(torch.bfloat16), nn.Linear(128, 64).to(torch.bfloat16)
    mask = synthetic_layer_mask(source.weight, 0.35, (16, 32))
    saved = HybridLinear.from_dense(source, mask, backend="split")
    assert not any(v is saved.packed.sparse_part._operand for v in saved.state_dict().values())
    loaded = HybridLinear.from_dense(other, mask, backend="split")
    calls = len(fake_gpu.compressed)
    loaded.load_state_dict(saved.state_dict())
    assert len(fake_gpu.compressed) == calls + 1
    x = torch.randn(9, 128).to(torch.bfloat16)
    torch.testing.assert_close(loaded(x), saved(x), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["split", "stripe"])
def test_24_layers_change_dtype(backend):
    torch.manual_seed(6)
    linear = nn.Linear(64, 32)
    mask = synthetic_layer_mask(linear.weight, 0.45, (16, 64) if backend == "stripe" else (16, 16))
    hybrid = HybridLinear.from_dense(linear, mask, backend=backend).to(torch.bfloat16)
    assert hybrid.packed_dtype == torch.bfloat16 and hybrid.packed.sparse_part.values.dtype == torch.bfloat16
    x = torch.randn(3, 64).to(torch.bfloat16)
    check_close(hybrid(x), x, masked(linear, mask).to(torch.bfloat16).float(), linear.bias.to(torch.bfloat16))


def test_converted_model_state_dict_holds_the_packed_weights(tiny_model):
    spec = synthetic_spec(select_linears(tiny_model), 0.45, (16, 16), seed=5)
    convert_model(tiny_model, spec, backend="cpu")
    keys = tiny_model.state_dict().keys()
    for name in spec.layers:
        assert f"{name}.packed_values" in keys and f"{name}.packed_meta" in keys

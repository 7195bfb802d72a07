"""Purifier(compile=...): the fused purification path through torch.compile. No graph breaks (the
maep_fast custom ops carry fake kernels), one compiled graph for every chunk size (batch dimension
marked dynamic; a chunk of 1 padded to 2), the documented mode rule (reduce-overhead = CUDA graphs
for chunks <= CUDA_GRAPH_MAX_BATCH on CUDA, default elsewhere) with power-of-two padding under CUDA
graphs, compiled == eager. Inductor itself is run once, on a tiny model (C++ compile on the CPU);
the rest uses a counting backend. The reduce-overhead run needs a GPU."""
from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo as dynamo

from conftest import tiny_mae
from maep_fast import native_available
from maep_fast.purify.maep import CUDA_GRAPH_MAX_BATCH, Purifier

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    dynamo.reset()
    yield
    dynamo.reset()


class Counting:
    """A torch.compile backend that records the graphs dynamo hands over and runs them as traced."""

    def __init__(self):
        self.graphs = []
        self.symbolic = []  # per graph: does some input have a symbolic (dynamic) size

    def __call__(self, gm, example_inputs):
        self.graphs.append([tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor)])
        vals = [n.meta.get("example_value") for n in gm.graph.nodes if n.op == "placeholder"]
        self.symbolic.append(any(isinstance(v, torch.SymInt) or
                                 (isinstance(v, torch.Tensor) and any(isinstance(d, torch.SymInt) for d in v.shape))
                                 for v in vals))
        return gm.forward


# ------------------------------------------------------------------ no graph breaks
@pytest.mark.parametrize("backend", ["auto", "torch", "cpp"])
@pytest.mark.parametrize("amp", [torch.float32, torch.bfloat16])
def test_no_graph_breaks(backend, amp):
    """What compile=True traces (reconstruct at mask 0 in the compute model, cast, clamp) is
    one graph: SDPA (auto), the reference ops (torch) or the maep_fast::masked_patch_attention custom
    op through its fake kernel (cpp)."""
    if backend == "cpp" and not native_available():
        pytest.skip("native extension not built")
    m = tiny_mae(in_chans=3).eval()
    m.set_backend(backend)
    pur = Purifier(m, fused=backend != "torch")
    pur.model.set_backend(backend)
    x = torch.rand(3, 3, 8, 8)
    model = pur.compute_model(amp)  # resolved outside the compiled function, as purify does (bf16: the cast copy)
    assert (model is m) == (amp == torch.float32)
    with torch.no_grad():
        ex = dynamo.explain(lambda t: pur._single(t, amp, model))(x)
    assert ex.graph_break_count == 0, ex.break_reasons
    assert ex.graph_count == 1
    if backend == "cpp":
        assert "maep_fast.masked_patch_attention" in str(ex.graphs[0].code)


# ------------------------------------------------------------------ shapes and recompiles
def test_one_graph_for_every_chunk_size():
    pur = Purifier(tiny_mae(in_chans=1), batch_size=4, compile=True, tile_overlap=2)
    counting = Counting()
    pur.compile_backend = counting
    eager = Purifier(copy.deepcopy(pur.model), batch_size=4)
    for n in (5, 7, 1, 12, 2, 3):  # chunks 4+1, 4+3, 1, 4+4+4, 2, 3
        x = torch.rand(n, 1, 8, 8)
        torch.testing.assert_close(pur.purify(x), eager.purify(x), atol=1e-5, rtol=0)
    big = torch.rand(2, 1, 13, 11)  # tiled: batches of 8x8 tiles, same compiled function
    torch.testing.assert_close(pur.purify(big), eager.purify(big), atol=1e-5, rtol=0)
    assert len(counting.graphs) == 1, counting.graphs
    assert counting.symbolic == [True]  # the batch dimension is symbolic
    assert len(pur._compiled) == 1  # one (shape, dtype, device, compute dtype, mode) key
    pur.purify(torch.rand(3, 1, 8, 8).double())  # another input dtype: its own entry and graph
    assert len(pur._compiled) == 2 and len(counting.graphs) == 2


def test_many_purifiers_stay_under_the_recompile_limit():
    """Each purifier and key compiles a code object of its own: with dynamo's recompile limit at 2,
    four compiled purifiers (and a second dtype) still each get their own compiled graph.

    The limit is set through dynamo's own scoped ``config.patch``: pytest's monkeypatch would
    restore it by deleting the attribute, which removes the config entry for the whole process."""
    counting = Counting()
    x = torch.rand(2, 1, 8, 8)
    with dynamo.config.patch(recompile_limit=2):
        for _ in range(4):
            pur = Purifier(tiny_mae(in_chans=1, depth=1, decoder_depth=1), compile=True)
            pur.compile_backend = counting
            pur.purify(x)
        pur.purify(x.double())
    assert len(counting.graphs) == 5
    assert dynamo.config.recompile_limit != 2  # restored on exit


def test_no_test_monkeypatches_a_torch_config_module():
    """Torch config modules keep their values outside the module ``__dict__``; monkeypatch's undo
    deletes such attributes (pytest >= 9.2), breaking every later compile in the process. Tests
    change torch settings with ``torch._dynamo.config.patch`` / ``torch._inductor.config.patch``."""
    import re
    from pathlib import Path

    pattern = re.compile(r"monkeypatch\.(setattr|delattr)\(\s*[\w.]*(config|_dynamo|_inductor|dynamo|inductor)\b")
    hits = [f"{p.name}:{i}" for p in Path(__file__).parent.glob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert hits == []


def test_mode_rule_and_padding():
    pur = Purifier(tiny_mae(in_chans=1), batch_size=256, compile=True)
    assert pur.compile_mode(CPU, 8) == "default" and pur.compile_mode(CPU, 1024) == "default"
    assert pur.compile_mode(CUDA, 1) == "reduce-overhead"
    assert pur.compile_mode(CUDA, CUDA_GRAPH_MAX_BATCH) == "reduce-overhead"
    assert pur.compile_mode(CUDA, CUDA_GRAPH_MAX_BATCH + 1) == "default"
    # CUDA graphs: power-of-two buckets capped at batch_size (bounded recordings); else only 1 -> 2
    assert [pur.padded_batch(n, "reduce-overhead", CUDA) for n in (1, 2, 3, 5, 100, 128, 200, 256)] == \
        [2, 2, 4, 8, 128, 128, 256, 256]
    assert [pur.padded_batch(n, "default", CUDA) for n in (1, 3, 200)] == [2, 3, 200]
    assert [pur.padded_batch(n, "reduce-overhead", CPU) for n in (1, 3)] == [2, 3]  # no CUDA graphs on CPU
    assert Purifier(tiny_mae(in_chans=1), batch_size=100).padded_batch(70, "reduce-overhead", CUDA) == 100
    explicit = Purifier(tiny_mae(in_chans=1), compile="max-autotune-no-cudagraphs")
    assert explicit.compile_mode(CUDA, 4) == "max-autotune-no-cudagraphs"
    with pytest.raises(ValueError, match="compile must be"):
        Purifier(tiny_mae(in_chans=1), compile="fast")


def test_cuda_graph_padding_bookkeeping_on_cpu(monkeypatch):
    """The CUDA-graph branch (pad to the bucket, run, copy the rows out) run on the CPU by pretending
    the mode records graphs: every chunk reaches the graph at its bucket size, results are eager's."""
    pur = Purifier(tiny_mae(in_chans=1), batch_size=8, compile="reduce-overhead")
    counting = Counting()
    pur.compile_backend = counting
    seen = []
    real = pur._compiled_fn

    def spy(xp, cdtype, mode, model):
        seen.append(xp.shape[0])
        return real(xp, cdtype, "default", model)  # the CPU cannot record CUDA graphs

    monkeypatch.setattr(pur, "_compiled_fn", spy)
    monkeypatch.setattr(Purifier, "records_cuda_graphs", staticmethod(lambda mode, device: True))
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: None)
    eager = Purifier(copy.deepcopy(pur.model), batch_size=8)
    x = torch.rand(19, 1, 8, 8)  # chunks 8 + 8 + 3 -> 8, 8, 4
    y = pur.purify(x)
    assert seen == [8, 8, 4]
    torch.testing.assert_close(y, eager.purify(x), atol=1e-5, rtol=0)
    y5 = pur.purify(x[:5])
    assert seen[-1] == 8 and y5.shape == (5, 1, 8, 8)


def test_compile_off_is_the_eager_path():
    pur = Purifier(tiny_mae(in_chans=1))
    assert pur.compile is False
    x = torch.rand(4, 1, 8, 8)
    y = pur.purify(x)
    assert not pur._compiled
    torch.testing.assert_close(y, pur.model.reconstruct(x).clamp(0, 1), atol=0, rtol=0)


# ------------------------------------------------------------------ inductor, once
def test_inductor_compiled_purify_matches_eager():
    """compile=True with the real backend (inductor, C++ on the CPU): one compile serves chunks of
    3, 3 and a ragged 1 (padded to 2) and a second call of another size; equals the eager path."""
    m = tiny_mae(in_chans=1, embed_dim=16, depth=1, num_heads=2, decoder_depth=1)
    pur = Purifier(m, batch_size=3, compile=True)
    eager = Purifier(copy.deepcopy(m), batch_size=3)
    x = torch.rand(7, 1, 8, 8)
    torch.testing.assert_close(pur.purify(x), eager.purify(x), atol=1e-5, rtol=1e-5)
    frames = dynamo.utils.counters["stats"]["unique_graphs"]
    x2 = torch.rand(2, 1, 8, 8)
    torch.testing.assert_close(pur.purify(x2), eager.purify(x2), atol=1e-5, rtol=1e-5)
    assert dynamo.utils.counters["stats"]["unique_graphs"] == frames  # no recompile for a new size
    assert len(pur._compiled) == 1


# ------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_reduce_overhead_on_cuda_matches_eager(precision):
    torch.manual_seed(0)
    m = tiny_mae(img_size=16, in_chans=3).cuda().eval()
    pur = Purifier(m, batch_size=8, compile=True, precision=precision)
    eager = Purifier(copy.deepcopy(m), batch_size=8, precision=precision)
    x = torch.rand(19, 3, 16, 16, device="cuda")  # chunks 8 + 8 + 3 (-> padded to 4)
    assert pur.compile_mode(x.device, 8) == "reduce-overhead"
    a = pur.purify(x)
    b = pur.purify(x)  # replays; earlier outputs must not be overwritten
    tol = 1e-4 if precision == "fp32" else 3e-2
    torch.testing.assert_close(a, eager.purify(x), atol=tol, rtol=0)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    big = Purifier(m, batch_size=256, compile=True, precision=precision)
    xb = torch.rand(200, 3, 16, 16, device="cuda")  # > CUDA_GRAPH_MAX_BATCH: default mode
    assert big.compile_mode(xb.device, 200) == "default"
    torch.testing.assert_close(big.purify(xb), eager.purify(xb), atol=tol, rtol=0)

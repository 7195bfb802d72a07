"""MAEPure(cuda_graph=True): argument errors on the CPU; on a GPU the captured step replays to the
eager no-grad result for the same seed (incl. a ragged last chunk, and under bf16 / fp16 autocast
inside the captured step), honours step halving and stays in the eta-ball and [0, 1]. The
static-buffer bookkeeping (noise order, step refills, the precision's autocast and graph key) is
also checked on the CPU by running it uncaptured."""
import pytest
import torch

from conftest import tiny_mae
from maep_fast.purify.mae_pure import MAEPure

@pytest.fixture(scope="module")
def mae():
    torch.manual_seed(0)
    return tiny_mae().eval()


# ------------------------------------------------------------------ CPU
def test_cpu_input_raises(mae):
    pur = MAEPure(mae, steps=2, seed=0, cuda_graph=True)
    with pytest.raises(ValueError, match="cuda_graph=True needs CUDA tensors"):
        pur.purify(torch.rand(2, 1, 8, 8))
    with pytest.raises(ValueError, match="cuda_graph"):  # forward without grad is purify
        pur(torch.rand(2, 1, 8, 8))


def test_early_stop_conflict_raises(mae):
    with pytest.raises(ValueError, match="cuda_graph=True does not support early_stop"):
        MAEPure(mae, steps=2, early_stop=1e-3, cuda_graph=True)
    pur = MAEPure(mae, steps=2, cuda_graph=True)
    pur.early_stop = 1e-3  # set after construction: still refused, never ignored
    with pytest.raises(ValueError, match="early_stop"):
        pur.purify(torch.rand(2, 1, 8, 8))


def test_cuda_graph_must_be_bool(mae):
    with pytest.raises(TypeError, match="cuda_graph must be a bool"):
        MAEPure(mae, cuda_graph=1)


@pytest.mark.parametrize("n_masks,halve", [(1, True), (2, False)])
def test_static_buffer_path_matches_eager_on_cpu(mae, n_masks, halve):
    """The graph path's bookkeeping run without capture (CPU): same noise order and step sizes as eager."""
    x = torch.rand(5, 1, 8, 8)
    kw = dict(steps=6, step_size=2 / 255, eta=8 / 255, n_masks=n_masks, halve_step=halve, seed=3, batch_size=3)
    ye = MAEPure(mae, **kw).purify(x)
    pur = MAEPure(mae, **kw)
    gen = pur._generator(x.device)
    outs = [pur._purify_chunk_graph(x[k:k + 3], gen, capture=False)[0] for k in range(0, 5, 3)]
    torch.testing.assert_close(torch.cat(outs), ye, atol=1e-6, rtol=0)
    assert not pur._graphs  # nothing cached without capture


def _assert_moves_in_half_steps(y, x, half, reach):
    """Every pixel that can never touch [0, 1] during the run (further than ``reach``, the most all
    steps can move it, from both ends) moved by a whole number of half steps. A pixel that was
    clipped at 0 or 1 on the way continues from the bound, not from x + k * half: the first GPU
    run's failure of this test (max 0.4965 of a half step) came from such pixels, counted by
    an ``0 < y < 1`` filter, in the graph and the eager path alike."""
    far = (x > reach + 1e-6) & (x < 1 - reach - 1e-6)
    assert far.float().mean().item() > 0.5
    k = (y - x)[far] / half
    assert (k - k.round()).abs().max().item() < 1e-3


@pytest.mark.parametrize("path", ["eager", "static_buffers"])
def test_step_halving_on_cpu(mae, path):
    """3 full + 3 half steps; the static-buffer path's step tensor holds 4/255, then 2/255."""
    x = torch.rand(6, 1, 8, 8)
    kw = dict(steps=6, step_size=4 / 255, eta=1.0, seed=1, halve_step=True)
    pur = MAEPure(mae, **kw)
    if path == "eager":
        y = pur.purify(x)
    else:
        seen = []
        real = pur._step_graph

        def spy(x0, capture=True, amp_dtype=None):
            sg = real(x0, capture, amp_dtype)
            run = sg.run

            def recording_run():
                seen.append(sg.step.unique().tolist())
                run()

            sg.run = recording_run
            return sg

        pur._step_graph = spy
        y = pur._purify_chunk_graph(x, pur._generator(x.device), capture=False)[0]
        assert seen == [[pytest.approx(4 / 255)]] * 3 + [[pytest.approx(2 / 255)]] * 3
    _assert_moves_in_half_steps(y, x, half=2 / 255, reach=18 / 255)
    assert (y - x).abs().max().item() <= 18 / 255 + 1e-6


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("path", ["eager", "static_buffers"])
def test_any_accepted_dtype_reaches_the_model_in_its_dtype(mae, dtype, path):
    """fp64 input used to reach the fp32 MAE as fp64 ('Input type (double) and bias type (float)')."""
    x = torch.rand(3, 1, 8, 8).to(dtype)
    pur = MAEPure(mae, steps=3, step_size=2 / 255, eta=3 / 255, seed=0)
    if path == "eager":
        y = pur.purify(x)
    else:
        y = pur._purify_chunk_graph(x, pur._generator(x.device), capture=False)[0]
    assert y.dtype == dtype and y.shape == x.shape
    tol = 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-9
    assert (y.double() - x.double()).abs().max().item() <= 3 / 255 + tol
    y32 = MAEPure(mae, steps=3, step_size=2 / 255, eta=3 / 255, seed=0).purify(x.float())
    if dtype == torch.float64:  # same masks, same model: the iterate's dtype only changes rounding
        torch.testing.assert_close(y.float(), y32, atol=1e-5, rtol=0)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("n_masks", [1, 2])
def test_static_buffer_path_matches_eager_under_precision(mae, precision, n_masks):
    """precision= under the graph path's bookkeeping (CPU, uncaptured): the autocast region is inside
    the step, the noise and step sizes are eager's, so the result is the eager path's for the seed."""
    x = torch.rand(5, 1, 8, 8)
    kw = dict(steps=6, step_size=2 / 255, eta=8 / 255, n_masks=n_masks, seed=3, batch_size=3, precision=precision)
    ye = MAEPure(mae, **kw).purify(x)
    pur = MAEPure(mae, **kw)
    gen = pur._generator(x.device)
    seen = []
    h = mae.decoder_pred.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    try:
        outs = [pur._purify_chunk_graph(x[k:k + 3], gen, capture=False)[0] for k in range(0, 5, 3)]
    finally:
        h.remove()
    want = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    assert set(seen) == {want}
    torch.testing.assert_close(torch.cat(outs), ye, atol=1e-6, rtol=0)


def test_graph_key_and_step_carry_the_precision(mae):
    """The compute dtype is part of the graph key (a graph captured in fp32 is never replayed for bf16)
    and of the step object; "auto" resolves to the caller's autocast."""
    pur = MAEPure(mae, steps=2, seed=0)
    x0 = torch.rand(4, 1, 8, 8)
    assert pur._graph_key(x0, torch.float32) != pur._graph_key(x0, torch.bfloat16)
    assert pur._step_graph(x0, capture=False).amp_dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert pur._step_graph(x0, capture=False).amp_dtype == torch.bfloat16
        assert MAEPure(mae, precision="fp32")._step_graph(x0, capture=False).amp_dtype == torch.float32
    sg = MAEPure(mae, steps=2, precision="bf16")._step_graph(x0, capture=False)
    assert sg.amp_dtype == torch.bfloat16 and sg.x.dtype == torch.float32 and sg.step.dtype == torch.float32
    sg.run()
    assert sg.loss.dtype == torch.float32 and sg.x.dtype == torch.float32


# ------------------------------------------------------------------ GPU
def _pair(model, x, **kw):
    eager = MAEPure(model, **kw).purify(x)
    pur = MAEPure(model, cuda_graph=True, **kw)
    return eager, pur.purify(x), pur


def _assert_close_mostly(a, b, frac=5e-3):
    """Equal up to fp tolerance; a sign(grad) tie flipped by fp noise may move a rare pixel."""
    bad = (a - b).abs() > 1e-5
    assert bad.float().mean().item() <= frac, f"{int(bad.sum())} of {bad.numel()} values differ"


def _cuda_model(**kw):
    torch.manual_seed(0)
    return tiny_mae(img_size=16, in_chans=3, **kw).cuda().eval()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("batch_size", [16, 6])  # 16: one chunk of 10; 6: chunks 6 + ragged 4
@pytest.mark.parametrize("n_masks", [1, 2])
def test_graph_matches_eager_same_seed(batch_size, n_masks):
    m = _cuda_model()
    x = torch.rand(10, 3, 16, 16, device="cuda")
    before = [p.requires_grad for p in m.parameters()]
    ye, yg, pur = _pair(m, x, steps=8, step_size=2 / 255, eta=8 / 255, n_masks=n_masks, seed=7,
                        batch_size=batch_size)
    _assert_close_mostly(yg, ye)
    assert len(pur._graphs) == (1 if batch_size >= 10 else 2)  # the ragged chunk has its own graph
    assert pur.last_steps_run.tolist() == [8] * 10
    # requires_grad restored after capture
    assert [p.requires_grad for p in m.parameters()] == before
    # replaying the cached graphs again (static buffers reset) gives the same result
    torch.testing.assert_close(pur.purify(x), yg, atol=0, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graph_matches_eager_global_rng():
    m = _cuda_model()
    x = torch.rand(4, 3, 16, 16, device="cuda")
    kw = dict(steps=5, step_size=2 / 255, eta=8 / 255, seed=None)
    torch.cuda.manual_seed(11)
    ye = MAEPure(m, **kw).purify(x)
    torch.cuda.manual_seed(11)
    yg = MAEPure(m, cuda_graph=True, **kw).purify(x)
    _assert_close_mostly(yg, ye)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graph_step_halving():
    m = _cuda_model()
    x = torch.rand(6, 3, 16, 16, device="cuda")
    kw = dict(steps=6, step_size=4 / 255, eta=1.0, seed=1)  # eta 1: the ball never clips, steps show
    ye_h, yg_h, _ = _pair(m, x, halve_step=True, **kw)
    ye_f, yg_f, _ = _pair(m, x, halve_step=False, **kw)
    _assert_close_mostly(yg_h, ye_h)
    _assert_close_mostly(yg_f, ye_f)
    assert (yg_h - yg_f).abs().max().item() > 1e-4  # the static step tensor was refilled
    _assert_moves_in_half_steps(yg_h, x, half=2 / 255, reach=18 / 255)
    # 3 full + 3 half steps: total movement at most 3 * 4/255 + 3 * 2/255
    assert (yg_h - x).abs().max().item() <= 18 / 255 + 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_graph_stays_in_ball_and_range(dtype):
    m = _cuda_model()
    x = torch.rand(5, 3, 16, 16, device="cuda").to(dtype)
    eta = 3 / 255
    pur = MAEPure(m, steps=10, step_size=2 / 255, eta=eta, seed=0, batch_size=3, cuda_graph=True)
    y = pur.purify(x)
    assert y.dtype == dtype and y.shape == x.shape
    tol = 1e-3 if dtype == torch.float16 else 1e-6
    assert (y.double() - x.double()).abs().max().item() <= eta + tol
    assert y.min().item() >= 0 and y.max().item() <= 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graph_rejects_training_mode():
    m = _cuda_model()
    pur = MAEPure(m, steps=2, cuda_graph=True)
    m.train()
    with pytest.raises(ValueError, match="eval mode"):
        pur.purify(torch.rand(2, 3, 16, 16, device="cuda"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("batch_size", [16, 6])
def test_graph_matches_eager_under_precision(precision, batch_size):
    """Autocast inside the captured step (weight-cast cache off): same result as the eager path."""
    m = _cuda_model()
    x = torch.rand(10, 3, 16, 16, device="cuda")
    ye, yg, pur = _pair(m, x, steps=8, step_size=2 / 255, eta=8 / 255, seed=7, batch_size=batch_size,
                        precision=precision)
    _assert_close_mostly(yg, ye, frac=2e-2)  # low precision: more sign(grad) ties flip
    assert all(k[3] == {"bf16": torch.bfloat16, "fp16": torch.float16}[precision] for k in pur._graphs)
    assert (yg - x).abs().max().item() <= 8 / 255 + 1e-6 and yg.min() >= 0 and yg.max() <= 1
    torch.testing.assert_close(pur.purify(x), yg, atol=0, rtol=0)

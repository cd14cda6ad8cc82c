"""Weight statistics (cdgrad.analysis) and the `analyze` experiment, against naive numpy references."""

from __future__ import annotations

import argparse
import itertools
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from cdgrad.analysis import (
    axis_correlation,
    channel_correlation_histogram,
    channel_correlation_matrix,
    channel_mean_std,
    correlation_profile,
    output_input_ratio,
    singular_value_ratios,
    singular_value_spectrum,
    summarize_state_dict,
)
from cdgrad.experiments.analyze import PLOTS, add_analyze_arguments, analyze, analyze_state_dict, run_analyze
from cdgrad.spectral import record_input_sizes

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def pairs_corr(w: np.ndarray, d: int, dim: int) -> float:
    """Collect the pairs (w[..a..], w[..a+d..]) one by one, then np.corrcoef."""
    o, i, kh, kw = w.shape
    xs, ys = [], []
    for a, b, h, k in itertools.product(range(o), range(i), range(kh), range(kw)):
        if dim == 0 and a + d < o:
            xs.append(w[a, b, h, k])
            ys.append(w[a + d, b, h, k])
        if dim == 1 and b + d < i:
            xs.append(w[a, b, h, k])
            ys.append(w[a, b + d, h, k])
    return float(np.corrcoef(xs, ys)[0, 1])


def dense_svdvals(w: torch.Tensor, n: int) -> torch.Tensor:
    o, i, kh, kw = w.shape
    basis = torch.eye(i * n * n, dtype=w.dtype).reshape(-1, i, n, n)
    pad = ((kw - 1) // 2, kw - 1 - (kw - 1) // 2, (kh - 1) // 2, kh - 1 - (kh - 1) // 2)
    cols = F.conv2d(F.pad(basis, pad, mode="circular"), w).reshape(i * n * n, -1).T
    return torch.linalg.svdvals(cols)


def moving_average(z: torch.Tensor, window: int, dim: int) -> torch.Tensor:
    """Sum of `window` consecutive entries along `dim` (adjacent sums share window - 1 terms)."""
    n = z.shape[dim] - window + 1
    return sum(z.narrow(dim, k, n) for k in range(window))


def smooth_along_output(seed: int = 0) -> torch.Tensor:
    """Unit-variance parts: window-5 average along O (lag-1 corr 0.8) + window-2 along I (lag-1 corr 0.5)."""
    g = torch.Generator().manual_seed(seed)
    a = moving_average(torch.randn(36, 32, 3, 3, dtype=F64, generator=g), 5, 0) / math.sqrt(5)
    b = moving_average(torch.randn(32, 33, 3, 3, dtype=F64, generator=g), 2, 1) / math.sqrt(2)
    return a + b


weights = st.tuples(st.integers(2, 6), st.integers(2, 6), st.integers(1, 3), st.integers(1, 3), st.integers(0, 10**6))


@settings(max_examples=40, deadline=None)
@given(spec=weights, d=st.integers(1, 5), dim=st.sampled_from([0, 1]))
def test_axis_correlation_matches_collected_pairs(spec, d, dim):
    o, i, kh, kw, seed = spec
    w = torch.randn(o, i, kh, kw, dtype=F64, generator=torch.Generator().manual_seed(seed))
    got = axis_correlation(w, d, dim)
    npairs = (w.shape[dim] - d) * w.numel() // w.shape[dim]
    if npairs < 2:
        assert math.isnan(got)
    else:
        assert got == pytest.approx(pairs_corr(w.numpy(), d, dim), abs=1e-12)


def test_axis_correlation_undefined_cases():
    assert math.isnan(axis_correlation(torch.randn(3, 4, 3, 3), 3, 0))
    assert math.isnan(axis_correlation(torch.ones(4, 4, 3, 3), 1, 0))
    assert math.isnan(output_input_ratio(torch.randn(5, 1, 3, 3)))


def test_correlation_profile_and_ratio():
    w = torch.randn(6, 4, 3, 3, dtype=F64)
    prof = correlation_profile(w, 6)
    assert prof["distance"] == [1, 2, 3, 4, 5, 6]
    for k, d in enumerate(prof["distance"]):
        for axis, dim, size in (("output", 0, 6), ("input", 1, 4)):
            if d < size:
                assert prof[axis][k] == pytest.approx(pairs_corr(w.numpy(), d, dim), abs=1e-12)
            else:
                assert math.isnan(prof[axis][k])
    assert output_input_ratio(w, 2) == pytest.approx(pairs_corr(w.numpy(), 2, 0) / pairs_corr(w.numpy(), 2, 1))


def test_smooth_along_output_has_ratio_above_one_and_transpose_below():
    w = smooth_along_output()
    r_out, r_in = axis_correlation(w, 1, 0), axis_correlation(w, 1, 1)
    assert r_out == pytest.approx(0.4, abs=0.05) and r_in == pytest.approx(0.25, abs=0.05)
    assert output_input_ratio(w) > 1
    wt = w.transpose(0, 1)
    assert output_input_ratio(wt) < 1
    assert output_input_ratio(wt) == pytest.approx(1 / output_input_ratio(w), rel=1e-12)


@pytest.mark.parametrize("dim", [0, 1])
def test_channel_correlation_matrix_and_histogram(dim):
    w = torch.randn(7, 5, 3, 2, dtype=F64)
    rows = np.stack([np.asarray(w.numpy().take(k, axis=dim)).ravel() for k in range(w.shape[dim])])
    ref = np.corrcoef(rows)
    c = channel_correlation_matrix(w, dim)
    np.testing.assert_allclose(c.numpy(), ref, atol=1e-12)
    counts, edges = channel_correlation_histogram(w, dim, bins=8)
    np.testing.assert_allclose(edges.numpy(), np.linspace(-1, 1, 9), atol=1e-15)
    off = ref[np.triu_indices(w.shape[dim], k=1)]
    np.testing.assert_array_equal(counts.numpy(), np.histogram(off, bins=edges.numpy())[0])
    assert int(counts.sum()) == w.shape[dim] * (w.shape[dim] - 1) // 2


def test_histogram_includes_perfect_correlation():
    w = torch.randn(1, 3, 2, 2, dtype=F64).repeat(4, 1, 1, 1)  # four identical output filters
    counts, _ = channel_correlation_histogram(w, 0, bins=4)
    assert counts.tolist() == [0, 0, 0, 6]


@pytest.mark.parametrize("dim", [0, 1])
def test_channel_mean_std_matches_loops(dim):
    w = torch.randn(4, 6, 3, 3, dtype=F64)
    mean, std = channel_mean_std(w, dim)
    a = w.numpy()
    for k in range(w.shape[dim]):
        vals = a[k] if dim == 0 else a[:, k]
        assert mean[k].item() == pytest.approx(float(np.mean(vals)), abs=1e-14)
        assert std[k].item() == pytest.approx(float(np.std(vals)), abs=1e-14)


def test_singular_value_spectrum_matches_dense():
    w = torch.randn(3, 2, 3, 3, dtype=F64)
    s = singular_value_spectrum(w, 5)
    torch.testing.assert_close(s, dense_svdvals(w, 5)[: s.numel()], rtol=0, atol=1e-10)


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 5, 3, stride=2, padding=1)
        self.proj = nn.Conv2d(5, 4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = self.proj(self.conv2(self.bn1(self.conv1(x))))
        return self.fc(x.mean(dim=(2, 3)))


def test_summarize_state_dict_rows():
    net = Small().double()
    sd = net.state_dict()
    rows = summarize_state_dict(sd)
    assert [r["name"] for r in rows] == ["conv1.weight", "conv2.weight"]
    for r in rows:
        w = sd[r["name"]]
        assert r["shape"] == tuple(w.shape) and r["op_norm"] is None
        assert r["corr_out"] == pytest.approx(pairs_corr(w.numpy(), 1, 0), abs=1e-12)
        assert r["corr_in"] == pytest.approx(pairs_corr(w.numpy(), 1, 1), abs=1e-12)
        assert r["ratio"] == pytest.approx(r["corr_out"] / r["corr_in"], rel=1e-12)
    assert [r["name"] for r in summarize_state_dict(sd, include_pointwise=True)][-1] == "proj.weight"

    sizes = record_input_sizes(net, torch.randn(1, 3, 6, 6, dtype=F64))  # module names
    rows = summarize_state_dict(sd, sizes)
    assert rows[0]["op_norm"] == pytest.approx(float(dense_svdvals(sd["conv1.weight"], 6)[0]), abs=1e-10)
    assert rows[1]["op_norm"] == pytest.approx(float(dense_svdvals(sd["conv2.weight"], 6)[0]), abs=1e-10)
    rows = summarize_state_dict(sd, {"conv1.weight": 4, "conv2.weight": 2})  # 2 < kernel: the folded kernel's norm
    assert rows[1]["op_norm"] == pytest.approx(float(dense_svdvals(sd["conv2.weight"], 2)[0]), abs=1e-10)
    assert summarize_state_dict(sd, {"conv1.weight": 4})[1]["op_norm"] is None  # no size: no norm


def test_bad_inputs():
    w = torch.randn(3, 3, 3, 3)
    with pytest.raises(ValueError, match="dim"):
        axis_correlation(w, 1, 2)
    with pytest.raises(ValueError, match="distance"):
        axis_correlation(w, 0, 0)
    with pytest.raises(ValueError, match="max_distance"):
        correlation_profile(w, 0)
    with pytest.raises(ValueError, match="bins"):
        channel_correlation_histogram(w, 0, bins=0)
    with pytest.raises(ValueError, match="weight"):
        channel_mean_std(torch.randn(3, 3), 0)
    with pytest.raises(TypeError, match="weight"):
        channel_correlation_matrix([[1.0]], 0)
    with pytest.raises(TypeError, match="state_dict"):
        summarize_state_dict([w])
    with pytest.raises(TypeError, match="input_sizes"):
        summarize_state_dict({"c.weight": w}, 4.5)


# ----------------------------------------------------------------------------- analyze experiment


def table_rows(table: str) -> list[list[str]]:
    lines = [ln for ln in table.splitlines() if ln.startswith("| ") and not ln.startswith("| layer")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]


@pytest.mark.parametrize("wrapped", [True, False])
def test_analyze_checkpoint(tmp_path, wrapped):
    net = Small()
    sd = net.state_dict()
    path = tmp_path / "ckpt.pt"
    torch.save({"model": sd, "epoch": 3} if wrapped else sd, path)
    out = tmp_path / "out"
    table = analyze(path, out, input_size=8)
    rows = table_rows(table)
    assert [r[0] for r in rows] == ["conv1.weight", "conv2.weight"]
    assert rows[0][1] == "6x3x3x3"
    w = sd["conv1.weight"].double()
    assert float(rows[0][2]) == pytest.approx(pairs_corr(w.numpy(), 1, 0), abs=6e-4)
    assert float(rows[0][3]) == pytest.approx(pairs_corr(w.numpy(), 1, 1), abs=6e-4)
    assert float(rows[0][5]) == pytest.approx(float(dense_svdvals(w, 8)[0]), abs=6e-4)
    assert "upper input size" in table
    for name in PLOTS:
        assert (out / name).is_file() and (out / name).stat().st_size > 1000
    assert (out / "summary.md").read_text() == table


def test_analyze_state_dict_per_layer_sizes(tmp_path):
    net = Small()
    sizes = record_input_sizes(net, torch.randn(1, 3, 8, 8))
    table = analyze_state_dict(net.state_dict(), tmp_path, sizes)
    rows = table_rows(table)
    w2 = net.state_dict()["conv2.weight"].double()
    assert float(rows[1][5]) == pytest.approx(float(dense_svdvals(w2, 8)[0]), abs=6e-4)
    assert "each layer's" in table


def test_analyze_errors_leave_no_output(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        analyze(tmp_path / "missing.pt", tmp_path / "out")
    bad = tmp_path / "bad.pt"
    bad.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="checkpoint"):
        analyze(bad, tmp_path / "out")
    lin = tmp_path / "lin.pt"
    torch.save(nn.Linear(2, 2).state_dict(), lin)
    with pytest.raises(ValueError, match="no conv weights"):
        analyze(lin, tmp_path / "out")
    notsd = tmp_path / "list.pt"
    torch.save([1, 2], notsd)
    with pytest.raises(ValueError, match="state_dict"):
        analyze(notsd, tmp_path / "out")
    with pytest.raises(ValueError, match="bins"):
        analyze_state_dict(Small().state_dict(), tmp_path / "out", 8, bins=0)
    assert not (tmp_path / "out").exists()


def test_cli_arguments(tmp_path, capsys):
    path = tmp_path / "ckpt.pt"
    torch.save({"model": Small().state_dict()}, path)
    parser = argparse.ArgumentParser()
    add_analyze_arguments(parser)
    args = parser.parse_args([str(path), "--out-dir", str(tmp_path / "o"), "--input-size", "6", "--bins", "10"])
    assert run_analyze(args) == 0
    printed = capsys.readouterr().out
    assert "conv2.weight" in printed and "@ 6x6" in printed
    assert all((tmp_path / "o" / name).is_file() for name in PLOTS)


def test_cli_finds_a_run_in_the_results_store(tmp_path, capsys):
    from cdgrad.experiments.store import ResultStore

    store = ResultStore(tmp_path / "results")
    key = "abc123"
    os.makedirs(os.path.dirname(store.model_path(key)), exist_ok=True)
    torch.save({"model": Small().state_dict()}, store.model_path(key))
    parser = argparse.ArgumentParser()
    add_analyze_arguments(parser)
    args = parser.parse_args([key, "--results", str(tmp_path / "results"), "--out-dir", str(tmp_path / "o")])
    assert run_analyze(args) == 0
    assert "conv1.weight" in capsys.readouterr().out
    missing = parser.parse_args(["nope", "--results", str(tmp_path / "results"), "--out-dir", str(tmp_path / "x")])
    with pytest.raises(FileNotFoundError, match="nope"):
        run_analyze(missing)


def test_nan_weights_give_a_clear_error_naming_the_layer():
    net = Small().double()
    state = net.state_dict()
    state["conv2.weight"][1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"state_dict\['conv2.weight'\].*non-finite"):
        summarize_state_dict(state, 8)
    with pytest.raises(ValueError, match="non-finite"):
        axis_correlation(state["conv2.weight"], 1, 0)
    with pytest.raises(ValueError, match="non-finite"):
        singular_value_spectrum(state["conv2.weight"], 8)


def test_singular_value_ratios_against_a_dense_svd():
    """Figs. 6-7 of Sedghi et al.: sigma_i / sigma_1 against i / N, from the brute-force SVD of the layer."""
    torch.manual_seed(11)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    rank, ratio = singular_value_ratios(singular_value_spectrum(w, 5))
    dense = dense_svdvals(w, 5)
    n = 5 * 5 * 3
    assert rank.shape == ratio.shape == (n,)
    torch.testing.assert_close(rank, torch.arange(1, n + 1, dtype=torch.float64) / n)
    torch.testing.assert_close(ratio, dense[:n] / dense[0])
    assert float(ratio[0]) == 1.0 and bool((ratio[1:] <= ratio[:-1]).all())
    _, zeros = singular_value_ratios(torch.zeros(6, dtype=torch.float64))
    assert torch.equal(zeros, torch.zeros(6, dtype=torch.float64))
    with pytest.raises(ValueError, match="spectrum"):
        singular_value_ratios(torch.zeros(0))


def test_kernel_magnitude_against_a_loop():
    from cdgrad.analysis import kernel_magnitude

    g = torch.Generator().manual_seed(4)
    w = torch.randn(5, 3, 3, 5, generator=g, dtype=torch.float64)
    expected = torch.zeros(3, 5, dtype=torch.float64)
    for i in range(3):
        for j in range(5):
            expected[i, j] = sum(abs(float(w[o, c, i, j])) for o in range(5) for c in range(3)) / 15
    expected /= expected.mean()
    torch.testing.assert_close(kernel_magnitude(w), expected, rtol=0, atol=1e-14)
    assert torch.equal(kernel_magnitude(torch.zeros(2, 2, 3, 3)), torch.ones(3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="conv weight"):
        kernel_magnitude(torch.zeros(3, 3))


def test_analyze_plots_the_scalings_a_sgs_checkpoint_holds(tmp_path):
    """A toolkit checkpoint of an SGS run carries G per layer at the first measurement and at the end: analyze
    plots both; a checkpoint without scalings gets neither plot."""
    from cdgrad.experiments.analyze import SGS_PLOTS, load_sgs_scalings

    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Conv2d(4, 4, 3))
    g = torch.rand(3, 3, dtype=torch.float64) + 0.5
    transform = {"type": "SpatialGradientScaling", "scalings": {"0": g, "1": 2 * g}, "first_scalings": {"0": g}}
    torch.save({"model": model.state_dict(), "method": {"transform": transform}}, tmp_path / "sgs.pt")
    start, end = load_sgs_scalings(tmp_path / "sgs.pt")
    assert set(start) == {"0"} and set(end) == {"0", "1"} and torch.equal(end["1"], 2 * g)
    analyze(tmp_path / "sgs.pt", tmp_path / "a", 8)
    assert all((tmp_path / "a" / name).is_file() for name in (*SGS_PLOTS, "kernel_magnitude.png"))
    torch.save({"model": model.state_dict()}, tmp_path / "plain.pt")
    assert load_sgs_scalings(tmp_path / "plain.pt") is None
    analyze(tmp_path / "plain.pt", tmp_path / "b", 8)
    assert not any((tmp_path / "b" / name).exists() for name in SGS_PLOTS)

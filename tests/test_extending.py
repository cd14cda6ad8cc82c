"""docs/extending.md: its example code runs as written and computes what the page says."""

from __future__ import annotations

import pytest
import torch

from helpers import DOCS, docs_python_blocks, run_docs_page


def reference(g: torch.Tensor, eps: float) -> torch.Tensor:
    """g[o] / sqrt(mean(g[o]^2) + eps), one output channel at a time."""
    out = torch.empty_like(g)
    for o in range(g.shape[0]):
        out[o] = g[o] / torch.sqrt((g[o] ** 2).mean() + eps)
    return out


@pytest.fixture(scope="module")
def page():
    from cdgrad.experiments.methods import unregister_method

    try:
        yield run_docs_page("extending.md")
    finally:
        unregister_method("channel-rms")


def test_the_page_has_its_example_and_the_toolkit_section():
    blocks = docs_python_blocks("extending.md")
    assert len(blocks) == 3 and "class ChannelRMSNormalize(cdgrad.ConfiguredTransform)" in blocks[0]
    assert "register_method(" in blocks[2]
    text = (DOCS / "extending.md").read_text(encoding="utf-8")
    assert "## Make it a toolkit method" in text


def test_pure_form(page):
    conv_grad, normalized = page["conv_grad"], page["normalized"]
    torch.testing.assert_close(normalized, reference(conv_grad, 1e-12), rtol=1e-6, atol=1e-7)
    assert not torch.allclose(normalized, conv_grad)  # it did something, and left its input alone
    rms = normalized.pow(2).mean(dim=(1, 2, 3)).sqrt()
    torch.testing.assert_close(rms, torch.ones(8), rtol=1e-5, atol=0)


def test_the_attached_step(page):
    model, before, grads = page["model"], page["before"], page["grads"]
    for p, b, g in zip(model.parameters(), before, grads, strict=True):
        expected = b - 0.1 * (reference(g, 1e-12) if p.dim() >= 2 else g)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-7)
    assert [p.dim() >= 2 for p in model.parameters()] == [True, False, True, False]


def test_state_round_trip_and_bad_state(page):
    restored = page["restored"]
    assert restored.eps == 1e-12 and restored.state_dict() == page["saved"]
    assert "eps" in page["rejected"]
    assert restored.config() == {"eps": 1e-12}


def test_the_toolkit_method(page):
    built, config = page["built"], page["config"]
    assert type(built).__name__ == "ChannelRMSNormalize" and built.eps == 1e-6
    assert config.method_args == {"rms_eps": 1e-6} and page["label"] == "channel-rms rms_eps=1e-06"
    assert "| `channel-rms` |" in page["method_table"]()
    assert "rms_eps" in page["refused"] and "> 0" in page["refused"]
    assert page["key"] != page["run_key"](config.replace(rms_eps=1e-5), 0)

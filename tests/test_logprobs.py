"""token_logprobs: chunked gather - logsumexp == log_softmax(logits / tau).gather."""

import math

import pytest
import torch

from rlopt.algorithms import token_logprobs

F64 = torch.float64


def inputs(dtype, n=3, t=7, v=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(n, t, v, generator=g, dtype=F64)).to(dtype)
    ids = torch.randint(0, v, (n, t), generator=g)
    return logits, ids


def direct(logits, ids, tau):
    return torch.log_softmax(logits / tau, dim=-1).gather(-1, ids[..., None]).squeeze(-1)


@pytest.mark.parametrize("tau", [1.0, 0.7, 1.3, 0.05])
@pytest.mark.parametrize("chunk_rows", [1, 4, 5, 1024])  # 21 rows: 4 and 5 do not divide it
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_matches_log_softmax_gather_value_and_gradient(tau, chunk_rows, dtype):
    logits, ids = inputs(dtype)
    x = logits.clone().requires_grad_(True)
    logp = token_logprobs(x, ids, temperature=tau, chunk_rows=chunk_rows)
    assert logp.shape == ids.shape and logp.dtype == dtype
    w = torch.randn(ids.shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
    (g,) = torch.autograd.grad((logp * w).sum(), x)
    y = logits.clone().requires_grad_(True)
    ref = direct(y, ids, tau)
    (g_ref,) = torch.autograd.grad((ref * w).sum(), y)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logp.detach(), ref.detach(), **tol)
    torch.testing.assert_close(g, g_ref, **tol)


@pytest.mark.parametrize("tau", [1.0, 0.6])
def test_bf16_input_is_upcast_per_chunk(tau):
    logits, ids = inputs(torch.bfloat16)
    x = logits.clone().requires_grad_(True)
    logp = token_logprobs(x, ids, temperature=tau, chunk_rows=4)
    assert logp.dtype == torch.float32  # computed in float32, not bf16
    # the reference: the same bf16 numbers, upcast to float64
    ref = direct(logits.to(F64), ids, tau)
    torch.testing.assert_close(logp.detach().to(F64), ref, rtol=1e-5, atol=1e-5)
    (g,) = torch.autograd.grad(logp.sum(), x)
    assert g.dtype == torch.bfloat16
    y = logits.to(F64).requires_grad_(True)
    (g_ref,) = torch.autograd.grad(direct(y, ids, tau).sum(), y)
    torch.testing.assert_close(g.to(F64), g_ref, rtol=1e-2, atol=1e-2)  # bf16 gradient precision


@pytest.mark.parametrize("tau", [1.0, 0.7])
def test_entropy_matches_direct_computation(tau):
    logits, ids = inputs(F64)
    logp, ent = token_logprobs(logits, ids, temperature=tau, chunk_rows=5, return_entropy=True)
    p = torch.softmax(logits / tau, dim=-1)
    ref = -(p * torch.log_softmax(logits / tau, dim=-1)).sum(-1)  # H = -sum p log p
    torch.testing.assert_close(ent, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logp, direct(logits, ids, tau), rtol=1e-12, atol=1e-12)


def test_entropy_hand_computed():
    # uniform over 4: log p = -log 4, H = log 4; a one-hot-ish row: H ~ 0
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]]], dtype=F64)
    ids = torch.tensor([[2, 0]])
    logp, ent = token_logprobs(logits, ids, return_entropy=True)
    assert logp[0, 0].item() == pytest.approx(-math.log(4))
    assert ent[0, 0].item() == pytest.approx(math.log(4))
    assert logp[0, 1].item() == pytest.approx(0.0, abs=1e-40) and ent[0, 1].item() == pytest.approx(0.0, abs=1e-40)


def test_small_and_degenerate_chunks():
    logits, ids = inputs(torch.float32, n=2, t=3)
    ref = direct(logits, ids, 1.0)
    for chunk_rows in (0, 1, 2, 6, 7, 10_000):  # 0 is treated as 1
        torch.testing.assert_close(token_logprobs(logits, ids, chunk_rows=chunk_rows), ref)
    empty = token_logprobs(torch.zeros(0, 5, 4), torch.zeros(0, 5, dtype=torch.long))
    assert empty.shape == (0, 5)


def test_validation():
    logits, ids = inputs(torch.float32)
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(logits, ids, temperature=0.0)
    with pytest.raises(ValueError, match="shape mismatch"):
        token_logprobs(logits, ids[:, :-1])

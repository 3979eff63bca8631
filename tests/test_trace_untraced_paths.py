"""`harness.trace.untraced_paths`: ops whose C++ branches on "any dispatch mode" run as untraced.

(The CUDA side, host and device lengths of ctc_loss in every grad mode, is in tests/test_unseen.py.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from harness.trace import Tracer
from harness.trace.emulated import EmulatedCuda

REAL_CTC_LOSS = torch.ctc_loss


def _ctc_args():
    torch.manual_seed(0)
    log_probs = torch.randn(9, 2, 5).log_softmax(-1)
    return log_probs, torch.tensor([[1, 2, 3], [2, 3, 4]]), torch.tensor([9, 7]), torch.tensor([3, 2])


class _Ops(TorchDispatchMode):
    """A user's own dispatch mode: the ops it sees."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_ctc_loss_under_a_tracer_calls_the_int_list_overload():
    """Untraced, plain length tensors take the int-list overload; a tracer's mode must not change
    that (PyTorch's C++ would call `_ctc_loss.Tensor` under any mode)."""
    args = _ctc_args()
    want = F.ctc_loss(*args)
    with torch.no_grad(), Tracer(None, keep_events=True) as t:
        got = F.ctc_loss(*args)
    ops = [e.op for e in t.events]
    assert "aten._ctc_loss.default" in ops and "aten._ctc_loss.Tensor" not in ops, ops
    assert torch.equal(got, want)


def test_another_mode_keeps_pytorchs_path():
    """Under a dispatch mode of the user's own (part of their program, untraced too), ctc_loss
    takes PyTorch's subclass path, with a tracer or without."""
    args = _ctc_args()
    with torch.no_grad(), Tracer(None), _Ops() as user:
        F.ctc_loss(*args)
    assert "aten._ctc_loss.Tensor" in user.ops and "aten._ctc_loss.default" not in user.ops


def test_lengths_must_be_integral_as_untraced():
    log_probs, targets, il, tl = _ctc_args()
    with pytest.raises(RuntimeError, match="input_lengths must be integral"):
        F.ctc_loss(log_probs, targets, il.float(), tl)
    with Tracer(None), pytest.raises(RuntimeError, match="input_lengths must be integral"):
        F.ctc_loss(log_probs, targets, il.float(), tl)


def test_torch_ctc_loss_is_put_back_whatever_the_order_blocks_end_in():
    """Installed while a tracer or the emulation is active, counted: the last one to end puts
    PyTorch's function back, also when they end in another order than they began."""
    emulation, tracer = EmulatedCuda(), Tracer(None)
    emulation.__enter__()
    tracer.__enter__()
    assert torch.ctc_loss is not REAL_CTC_LOSS
    emulation.__exit__(None, None, None)
    assert torch.ctc_loss is not REAL_CTC_LOSS  # the tracer is still active
    tracer.__exit__(None, None, None)
    assert torch.ctc_loss is REAL_CTC_LOSS
    with Tracer(None):
        with EmulatedCuda():
            pass
        assert torch.ctc_loss is not REAL_CTC_LOSS
    assert torch.ctc_loss is REAL_CTC_LOSS

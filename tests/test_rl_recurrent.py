"""Recurrent Q-learning: causality, the sequence TD loss against a step-by-step computation, padding masks."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from metalab.rl import recurrent
from metalab.rl.common import td_target


def test_recurrent_q_is_causal_and_carries_state() -> None:
    torch.manual_seed(0)
    net = recurrent.RecurrentNet(3, 2, hidden=8)
    x = torch.randn(2, 6, 3)
    q, _ = net(x)
    changed = x.clone()
    changed[:, 4] += 1.0
    q2, _ = net(changed)
    torch.testing.assert_close(q[:, :4], q2[:, :4])  # the past does not see the future
    assert not torch.allclose(q[:, 4:], q2[:, 4:])
    # reading in two halves with the carried state equals reading at once
    first, h = net(x[:, :3])
    second, _ = net(x[:, 3:], h)
    torch.testing.assert_close(torch.cat([first, second], 1), q)


def test_sequence_td_loss_equals_step_by_step_double_dqn_and_ignores_padding() -> None:
    torch.manual_seed(0)
    net = recurrent.RecurrentNet(4, 3, hidden=8)
    online = dict(net.named_parameters())
    target = {k: v.detach() + 0.1 * torch.randn_like(v) for k, v in online.items()}
    b, t = 2, 5
    inputs = torch.randn(b, t + 1, 4)
    action = torch.randint(0, 3, (b, t))
    reward = torch.randn(b, t)
    terminal = torch.zeros(b, t, dtype=torch.bool)
    terminal[0, 4] = True
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[1, 3:] = False  # row 1 is 3 steps long
    loss, _ = recurrent.sequence_td_loss(
        net, online, target, recurrent.SequenceBatch(inputs, action, reward, terminal, mask), 0.9
    )

    total, count = 0.0, 0
    for i in range(b):
        q_on = recurrent.sequence_q(net, online, inputs[i : i + 1])[0]  # (t+1, A)
        q_tg = recurrent.sequence_q(net, target, inputs[i : i + 1])[0]
        for s in range(t):
            if not mask[i, s]:
                continue
            best = q_on[s + 1].argmax()
            y = reward[i, s] + 0.9 * (1.0 - float(terminal[i, s])) * q_tg[s + 1, best]
            total = total + F.smooth_l1_loss(q_on[s, action[i, s]], y.detach())
            count += 1
    torch.testing.assert_close(loss, total / count)
    # padded steps carry no gradient: changing their rewards changes nothing
    reward2 = reward.clone()
    reward2[1, 3:] += 100.0
    loss2, _ = recurrent.sequence_td_loss(
        net, online, target, recurrent.SequenceBatch(inputs, action, reward2, terminal, mask), 0.9
    )
    torch.testing.assert_close(loss, loss2)
    y = td_target(reward, terminal.float(), torch.zeros(b, t, 3), 0.9)
    torch.testing.assert_close(y, reward)  # sanity of the shared target on (B, T, A) values


def test_pad_sequences_pads_and_keeps_rows() -> None:
    def row(steps: int, task: int) -> recurrent.Sequences:
        return recurrent.Sequences(
            inputs=np.ones((1, steps + 1, 2), np.float32),
            action=np.ones((1, steps), np.int64),
            reward=np.ones((1, steps), np.float32),
            terminal=np.zeros((1, steps), bool),
            mask=np.ones((1, steps), bool),
            task=np.array([task]),
        )

    out = recurrent.pad_sequences([row(2, 7), row(4, 9)])
    assert out.inputs.shape == (2, 5, 2) and out.action.shape == (2, 4)
    assert out.mask.sum(1).tolist() == [2, 4] and out.task.tolist() == [7, 9]
    assert out.inputs[0, 3:].sum() == 0
    np.testing.assert_array_equal(recurrent.one_hot(2, 4), [0, 0, 1, 0])
    np.testing.assert_array_equal(recurrent.one_hot(-1, 3), [0, 0, 0])

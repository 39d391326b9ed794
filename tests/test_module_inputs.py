"""What the module hands to components beyond (rewards, log-probs): the per-function rewards
(GDPO), the KL folded into the reward (REINFORCE++), the adaptive entropy coefficient and the
reference refresh, through the real configs."""

from __future__ import annotations

import torch

from rlopt.train import build

from .conftest import compose_train

BASE = ["debug=default", "logger=none", "callbacks=none", "export_dir=null", "data.batch_size=4"]
TWO_REWARDS = "+task.rewards.exact={_target_:rlopt.rewards.exact_match,_partial_:true}"


def _module(tmp_path, *overrides):
    cfg = compose_train(tmp_path, [*BASE, *overrides])
    return build(cfg)


def _spy(module):
    calls = []
    real = module.advantage.__call__

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    module.advantage = type("Spy", (), {"__call__": staticmethod(spy), "needs": module.advantage.needs,
                                        "check_group_size": module.advantage.check_group_size})()
    return calls


def test_gdpo_gets_each_reward_function(tmp_path):
    module, dm, trainer = _module(tmp_path, "algorithm=gdpo", TWO_REWARDS, "steps=1", "trainer.max_steps=1")
    calls = _spy(module)
    trainer.fit(module, datamodule=dm)
    [kw] = calls
    assert set(kw["reward_components"]) == {"match", "exact"} and set(kw["reward_weights"]) == {"match", "exact"}
    assert all(v.shape == (4 * module.group_size,) for v in kw["reward_components"].values())


def test_reinforce_pp_gets_the_kl_to_the_reference(tmp_path):
    module, dm, trainer = _module(tmp_path, "algorithm=reinforce_pp", "steps=3", "trainer.max_steps=3")
    assert module.ref_policy is not None  # no KL loss, but the KL in the reward needs the reference
    calls = _spy(module)
    trainer.fit(module, datamodule=dm)
    kl0 = calls[0]["kl"]
    assert kl0.shape[0] == 4 * module.group_size and torch.allclose(kl0, torch.zeros_like(kl0), atol=1e-6)  # start: ref == policy
    # the first step whose update moved the weights (a step where every reward is 0 and the
    # policy still equals the reference has zero advantages, hence no gradient)
    moved = next(i for i, h in enumerate(module.history) if h["grad/norm"] > 0)
    assert moved < 2 and all(calls[i]["kl"].abs().max() < 1e-6 for i in range(moved + 1))
    assert calls[moved + 1]["kl"].abs().max() > 1e-3  # the policy has moved away from the reference


def test_adaptive_entropy_coefficient_moves_and_is_checkpointed(tmp_path):
    module, dm, trainer = _module(tmp_path, "algorithm=adaptive_entropy", "entropy.target=100.0", "entropy.delta=0.01",
                                  "steps=3", "trainer.max_steps=3")
    trainer.fit(module, datamodule=dm)
    # entropy (about log 40 nats at most) stays below a target of 100: the coefficient rises by delta a step
    coefs = [h["entropy/coef"] for h in module.history]
    assert coefs == sorted(coefs) and coefs[-1] > coefs[0] and module.objective.entropy_coef == coefs[-1]
    ckpt: dict = {}
    module.on_save_checkpoint(ckpt)
    assert ckpt["rlopt"]["entropy_controller"]["coef"] == module.entropy_controller.state_dict()["coef"]


def test_reference_refresh_with_alpha_one_copies_the_policy(tmp_path):
    module, dm, trainer = _module(tmp_path, "kl.ref_sync_every=1", "kl.ref_sync_alpha=1.0", "steps=1",
                                  "trainer.max_steps=1")
    trainer.fit(module, datamodule=dm)
    for p, r in zip(module.policy.parameters(), module.ref_policy.parameters()):
        assert torch.equal(p, r)
    module, dm, trainer = _module(tmp_path, "steps=1", "trainer.max_steps=1")  # default: no refresh
    trainer.fit(module, datamodule=dm)
    assert any(not torch.equal(p, r) for p, r in zip(module.policy.parameters(), module.ref_policy.parameters()))

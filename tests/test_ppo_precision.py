"""How a PPO update is computed: the same update whatever the micro-batch split, bf16 autocast over fp32
master weights (and pure bf16 weights refused), rollout forwards in bounded micro-batches."""

import pytest
import torch

from tests.ppo_support import make_config, trainer_for


def stop_tokens() -> list[str]:
    """Sixty ordinary tokens as stops: the random tiny policy then ends replies at many different lengths."""
    from rlhf.models import load_tokenizer

    return load_tokenizer("tiny:demo").convert_ids_to_tokens(list(range(40, 100)))


def one_step(tmp_path, **overrides):
    from accelerate.state import AcceleratorState

    cfg = make_config(tmp_path, "--stop_tokens", *stop_tokens(), max_steps=1, ppo_epochs=2, num_minibatches=1,
                      **overrides)
    AcceleratorState._reset_state(reset_partial_state=True)  # one process, several precisions: a fresh state each
    trainer = trainer_for(cfg)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    metrics = trainer.step()
    return trainer, before, metrics


def test_the_update_does_not_depend_on_how_the_minibatch_is_split(tmp_path):
    # replies of different lengths make micro-batches hold different token counts: a mean of micro-batch means
    # would weigh tokens unequally; the token-mean over the whole minibatch does not
    runs = {ga: one_step(tmp_path / f"ga{ga}", gradient_accumulation_steps=ga) for ga in (1, 2, 4)}
    lengths = runs[1][0].last_rollout.response_mask.sum(1)
    assert len(set(lengths.tolist())) > 1  # the setting exercises unequal micro-batches
    reference = runs[1]
    for ga in (2, 4):
        trainer, _, metrics = runs[ga]
        assert metrics["train/grad_norm"] == pytest.approx(reference[2]["train/grad_norm"], rel=1e-4)
        for a, b in zip(trainer.model.parameters(), reference[0].model.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_bf16_autocast_updates_the_weights_as_fp32_does_and_passes_the_ratio_check(tmp_path):
    def relative_update(trainer, before):
        after = list(trainer.model.parameters())
        return (sum(float((a - b).norm() ** 2) for a, b in zip(after, before)) ** 0.5
                / sum(float(b.norm() ** 2) for b in before) ** 0.5)

    fp32 = one_step(tmp_path / "fp32", learning_rate=1e-5)
    bf16 = one_step(tmp_path / "bf16", learning_rate=1e-5, bf16="true")  # passed the ratio check at 1e-3
    assert bf16[0].accelerator.mixed_precision == "bf16"
    assert all(p.dtype == torch.float32 for p in bf16[0].model.parameters())  # fp32 master weights
    ratio = relative_update(*bf16[:2]) / relative_update(*fp32[:2])
    assert 0.5 < ratio < 2.0, ratio  # the same size of step; only rounding of the forward differs
    changed = sum(int((a != b).sum()) for a, b in zip(bf16[0].model.parameters(), bf16[1]))
    assert changed / sum(p.numel() for p in bf16[1]) > 0.9  # the updates are not lost to bf16 rounding


def test_pure_bf16_weights_are_refused_with_the_reason(tmp_path):
    with pytest.raises(ValueError, match=r"dtype: bfloat16 .* updates below the format's resolution are lost"):
        make_config(tmp_path, dtype="bfloat16").derive(1)
    make_config(tmp_path, dtype="bfloat16", topology="lora").derive(1)  # a frozen bf16 base is fine


def test_rollout_forwards_in_micro_batches_give_the_same_logprobs(tmp_path):
    trainer = trainer_for(make_config(tmp_path, max_steps=1))
    ro = trainer.rollout(trainer.step_prompts(0))
    whole = trainer.logprobs_and_values(ro)
    trainer.cfg.local_rollout_forward_batch_size = 3  # 8 sequences in forwards of 3, 3 and 2
    parts = trainer.logprobs_and_values(ro)
    for a, b in zip(whole, parts):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_the_critic_can_be_clipped_on_its_own(tmp_path):
    trainer, before, metrics = one_step(tmp_path, critic_max_grad_norm=1e-8, learning_rate=1e-3)
    model = trainer.accelerator.unwrap_model(trainer.model)
    critic_ids = {id(p) for p in model.critic_parameters()}
    params = list(trainer.model.parameters())
    critic_change = max(float((a - b).abs().max()) for a, b in zip(params, before) if id(a) in critic_ids)
    policy_change = max(float((a - b).abs().max()) for a, b in zip(params, before) if id(a) not in critic_ids)
    assert metrics["train/critic_grad_norm"] > 1e-3 and metrics["train/grad_norm"] > 0  # both norms are logged
    assert policy_change > 1e-4  # the policy took its step ...
    # ... while AdamW's step on a gradient clipped to 1e-8 is that gradient over (|g| + eps 1e-5): tiny
    assert critic_change < 0.01 * policy_change

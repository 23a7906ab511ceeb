"""Policy, reference and critic in three topologies behind one interface (the critic only for GAE).

``forward(input_ids, attention_mask, position_ids) -> (logits [B, L, V], values [B, L])`` is one module
call, so DDP sees a single forward per backward whatever the topology:

- ``separate``: the full policy plus a critic loaded as a sequence-classification model from the reward
  model (its value head starts as the RM's score head: docs/design.md, detail 11); the reference is a frozen copy.
- ``lora``: one frozen base model; the policy is the ``default`` LoRA adapter, the critic a second
  ``critic`` adapter plus a value head, the reference the base with adapters disabled (one model in memory).
- ``shared``: one backbone with the LM head (policy) and a value head on its last hidden state.
"""

from __future__ import annotations

import copy
import os

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from ..models import disable_dropout, ensure_pad_token, fit_to_tokenizer, resolve_model_path


def _dtype(name: str):
    return getattr(torch, name)


def _value_head_like(score: nn.Linear | None, hidden_size: int) -> nn.Linear:
    """A value head initialised from a reward model's score head when shapes allow, else zeros."""
    head = nn.Linear(hidden_size, 1, bias=False)
    with torch.no_grad():
        if score is not None and score.weight.shape == head.weight.shape:
            head.weight.copy_(score.weight.float())
        else:
            head.weight.zero_()
    return head


def _load_score_head(path: str | None, trust_remote_code: bool = False) -> nn.Linear | None:
    if not path:
        return None
    rm = AutoModelForSequenceClassification.from_pretrained(resolve_model_path(path), num_labels=1,
                                                            trust_remote_code=trust_remote_code)
    rm.score.rm_config = rm.config  # its stored reward statistics scale the value head
    return rm.score


def _critic_as_sequence_classifier(backbone_config, backbone_state: dict, value_head: nn.Linear, pad_token_id: int):
    """A standard ``AutoModelForSequenceClassification`` holding a backbone and a value head, for saving."""
    config = copy.deepcopy(backbone_config)
    config.num_labels, config.pad_token_id = 1, pad_token_id
    critic = AutoModelForSequenceClassification.from_config(config)
    prefix = critic.base_model_prefix + "."
    missing, _ = critic.load_state_dict({prefix + k: v for k, v in backbone_state.items()}, strict=False)
    if any(not m.startswith("score") for m in missing):
        raise RuntimeError(f"critic backbone weights missing when saving: {missing[:5]}")
    with torch.no_grad():
        critic.score.weight.copy_(value_head.weight)
    return critic


class PolicyOnly(nn.Module):
    """The policy alone, for the critic-free estimators (GRPO, Dr. GRPO, RLOO, REINFORCE++): no critic is
    built, loaded, stepped or saved; ``forward`` returns (logits, None)."""

    def __init__(self, policy):
        super().__init__()
        self.policy = policy

    def forward(self, input_ids, attention_mask, position_ids, logits_to_keep: int = 0):
        return self.policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                           logits_to_keep=logits_to_keep).logits, None

    def generation_model(self):
        return self.policy

    def fsdp_roots(self):
        return [self.policy]

    def policy_parameters(self):
        return [p for p in self.policy.parameters() if p.requires_grad]

    def critic_parameters(self):
        return []

    def save(self, out: str, tokenizer, state_dict: dict | None = None) -> None:
        self.policy.save_pretrained(out, state_dict=_part(state_dict, "policy."))
        tokenizer.save_pretrained(out)


def _part(state_dict: dict | None, prefix: str) -> dict | None:
    """One sub-model's entries of the wrapper's full state dict (FSDP2 gathers the whole wrapper at once)."""
    if state_dict is None:
        return None
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


class SeparateActorCritic(nn.Module):
    def __init__(self, policy, critic):
        super().__init__()
        self.policy, self.critic = policy, critic
        if not isinstance(getattr(critic, "score", None), nn.Linear):
            raise ValueError(f"critic {type(critic).__name__} has no `score` head to use as a value head")

    def forward(self, input_ids, attention_mask, position_ids, logits_to_keep: int = 0):
        logits = self.policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             logits_to_keep=logits_to_keep).logits
        hidden = self.critic.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                        position_ids=position_ids).last_hidden_state
        return logits, self.critic.score(hidden).squeeze(-1)

    def generation_model(self):
        return self.policy

    def fsdp_roots(self):
        return [self.policy, self.critic.base_model, self.critic.score]  # what forward calls

    def policy_parameters(self):
        return [p for p in self.policy.parameters() if p.requires_grad]

    def critic_parameters(self):
        return [p for p in self.critic.parameters() if p.requires_grad]

    def save(self, out: str, tokenizer, state_dict: dict | None = None) -> None:
        self.policy.save_pretrained(out, state_dict=_part(state_dict, "policy."))
        tokenizer.save_pretrained(out)
        self.critic.save_pretrained(os.path.join(out, "critic"), state_dict=_part(state_dict, "critic."))
        tokenizer.save_pretrained(os.path.join(out, "critic"))


def last_hidden_and_logits(lm, logits_to_keep: int = 0, **inputs):
    """A causal LM's last hidden states [B, L, H] and the logits of its last ``logits_to_keep`` positions from
    one pass, without ``output_hidden_states`` (which would keep every layer's states alive)."""
    if any(getattr(lm.config, k, None) for k in ("final_logit_softcapping", "logit_scale")):
        out = lm(**inputs, output_hidden_states=True, logits_to_keep=logits_to_keep)  # the model shapes its logits
        return out.hidden_states[-1], out.logits
    hidden = lm.base_model(**inputs).last_hidden_state
    return hidden, lm.get_output_embeddings()(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)


class SharedActorCritic(nn.Module):
    def __init__(self, policy, value_head: nn.Linear):
        super().__init__()
        self.policy, self.value_head = policy, value_head

    def forward(self, input_ids, attention_mask, position_ids, logits_to_keep: int = 0):
        hidden, logits = last_hidden_and_logits(self.policy, logits_to_keep, input_ids=input_ids,
                                                attention_mask=attention_mask, position_ids=position_ids)
        return logits, self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)

    def generation_model(self):
        return self.policy

    def policy_parameters(self):
        return [p for p in self.policy.parameters() if p.requires_grad]

    def critic_parameters(self):
        return list(self.value_head.parameters())

    def save(self, out: str, tokenizer) -> None:
        self.policy.save_pretrained(out)
        tokenizer.save_pretrained(out)
        state = self.policy.base_model.state_dict()
        critic = _critic_as_sequence_classifier(self.policy.config, state, self.value_head, tokenizer.pad_token_id)
        critic.save_pretrained(os.path.join(out, "critic"))
        tokenizer.save_pretrained(os.path.join(out, "critic"))


class LoraActorCritic(nn.Module):
    """One base model, two adapters (one without a critic). peft's ``set_adapter`` freezes inactive adapters,
    so after each switch the trainable set is restored: both adapters must train from the one backward pass."""

    def __init__(self, peft_model, value_head: nn.Linear | None):
        super().__init__()
        self.model, self.value_head = peft_model, value_head
        self._trainable = [p for n, p in peft_model.named_parameters() if "lora_" in n]
        for p in self._trainable:
            p.requires_grad_(True)

    def _use(self, adapter: str) -> None:
        self.model.base_model.set_adapter(adapter)
        for p in self._trainable:
            p.requires_grad_(True)

    def forward(self, input_ids, attention_mask, position_ids, logits_to_keep: int = 0):
        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        if self.value_head is None:
            self._use("default")
            return self.model(**kwargs, logits_to_keep=logits_to_keep).logits, None
        self._use("critic")
        hidden = self.model.get_base_model().base_model(**kwargs).last_hidden_state  # no logits needed
        values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)
        self._use("default")
        return self.model(**kwargs, logits_to_keep=logits_to_keep).logits, values

    def generation_model(self):
        self._use("default")
        return self.model

    def policy_parameters(self):
        return [p for n, p in self.model.named_parameters() if "lora_" in n and ".default." in n]

    def critic_parameters(self):
        if self.value_head is None:
            return []
        return [p for n, p in self.model.named_parameters() if "lora_" in n and ".critic." in n] + list(
            self.value_head.parameters())

    def save(self, out: str, tokenizer) -> None:
        self.model.save_pretrained(out, selected_adapters=["default"])  # a peft adapter for the policy
        tokenizer.save_pretrained(out)
        if self.value_head is None:
            return
        merged = copy.deepcopy(self.model)
        merged.base_model.set_adapter("critic")
        merged = merged.merge_and_unload(adapter_names=["critic"])
        critic = _critic_as_sequence_classifier(merged.config, merged.base_model.state_dict(), self.value_head,
                                                tokenizer.pad_token_id)
        critic.save_pretrained(os.path.join(out, "critic"))
        tokenizer.save_pretrained(os.path.join(out, "critic"))


@torch.no_grad()
def reference_logits(actor_critic, ref_model, input_ids, attention_mask, position_ids, logits_to_keep: int = 0):
    """Logits of the frozen reference: a separate model, or (LoRA) the base with adapters disabled."""
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                  logits_to_keep=logits_to_keep)
    if ref_model is not None:
        return ref_model(**kwargs).logits
    with actor_critic.model.disable_adapter():
        return actor_critic.model(**kwargs).logits


def _value_scale(critic_config, normalized: bool) -> float:
    """PPO's scores are (r - mean) / std of the RM's stored statistics; a value head copied from that RM's
    score head is on the raw scale, so it is divided by std to start near the returns' scale (the initial
    value loss is then small instead of ~std^2). The mean cannot move into a bias-free head: it stays as an
    offset of mean/std, near 0 for an RM trained with center_rewards_coefficient."""
    from reward_models.scoring import REWARD_STD_KEY

    std = getattr(critic_config, REWARD_STD_KEY, None) if normalized else None
    return 1.0 / float(std) if std else 1.0


def build_actor_critic(cfg, tokenizer):
    """(actor_critic, ref_model or None) for ``cfg.topology``. Every model is fit to the policy's tokenizer
    (an added pad token grows each one's embeddings alike) and has dropout off (docs/design.md, details 1, 3)."""
    dtype = _dtype(cfg.dtype)
    policy_path = resolve_model_path(cfg.model_name_or_path)
    critic_path = cfg.critic_model or cfg.reward_model
    remote = {"trust_remote_code": cfg.trust_remote_code, "attn_implementation": cfg.attn_implementation}
    policy = AutoModelForCausalLM.from_pretrained(policy_path, dtype=dtype, **remote)
    ensure_pad_token(tokenizer, policy)
    ref = None
    if cfg.topology in ("separate", "shared"):
        ref = AutoModelForCausalLM.from_pretrained(resolve_model_path(cfg.ref_model or policy_path), dtype=dtype,
                                                   **remote)
        fit_to_tokenizer(ref, tokenizer, "the reference model")
        disable_dropout(ref)
        ref.eval().requires_grad_(False)
    normalized = cfg.reward_normalization and critic_path is not None
    if not cfg.needs_critic and cfg.topology != "lora":
        model = PolicyOnly(policy)
    elif cfg.topology == "separate":
        critic_source = resolve_model_path(critic_path or policy_path)
        critic = AutoModelForSequenceClassification.from_pretrained(critic_source, num_labels=1, dtype=dtype, **remote)
        fit_to_tokenizer(critic, tokenizer, f"the critic ({critic_source})")
        with torch.no_grad():
            critic.score.weight.mul_(_value_scale(critic.config, normalized))
        model = SeparateActorCritic(policy, critic)
    else:
        score = _load_score_head(critic_path, cfg.trust_remote_code) if cfg.needs_critic else None
        head = _value_head_like(score, policy.config.hidden_size) if cfg.needs_critic else None
        if score is not None:
            with torch.no_grad():
                head.weight.mul_(_value_scale(score.rm_config, normalized))
        if cfg.topology == "shared":
            model = SharedActorCritic(policy, head)
        else:
            from peft import LoraConfig, get_peft_model

            lora = dict(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                        target_modules=cfg.lora_target_modules, task_type="CAUSAL_LM")
            peft_model = get_peft_model(policy, LoraConfig(**lora))
            if head is not None:
                peft_model.add_adapter("critic", LoraConfig(**lora))
            model = LoraActorCritic(peft_model, head)
    disable_dropout(model)
    if cfg.activation_checkpointing:  # trained models only: the frozen reference keeps no activations anyway
        trained = [policy, *([model.critic] if isinstance(model, SeparateActorCritic) else [])]
        for m in trained:
            m.activation_checkpointing_enable({"use_reentrant": False})
    return model, ref

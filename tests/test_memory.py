"""``rlhf estimate-memory`` (rlhf/memory.py): parameter counts, activation bytes, ZeRO/LoRA/PPO arithmetic,
the command line, and the estimate against the measured peak memory of real training steps on CPU."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

from rlhf import memory, memory_command
from rlhf.memory import (
    GIB,
    LINEARS,
    ModelShape,
    activation_bytes_per_token,
    count_params,
    estimate,
    lora_params,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QWEN25_05B = {"model_type": "qwen2", "hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14,
              "num_key_value_heads": 2, "intermediate_size": 4864, "vocab_size": 151936, "tie_word_embeddings": True,
              "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "architectures": ["Qwen2ForCausalLM"]}
SMALL = dict(vocab_size=1000, hidden_size=64, intermediate_size=176, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, pad_token_id=0)
PEFT_NAMES = {t: f"{t}_proj" for t in LINEARS}


def _shape(config) -> ModelShape:
    return ModelShape.from_config(config.to_dict())


@pytest.mark.parametrize("config", [
    LlamaConfig(**SMALL, tie_word_embeddings=True),
    LlamaConfig(**SMALL, tie_word_embeddings=False),
    LlamaConfig(**SMALL, attention_bias=True, head_dim=32),
    Qwen2Config(**SMALL, tie_word_embeddings=True),
    Qwen2Config(**SMALL, tie_word_embeddings=False),
    MistralConfig(**SMALL),
    Qwen3Config(**SMALL, head_dim=24),
], ids=["llama-tied", "llama-untied", "llama-bias-headdim", "qwen2-tied", "qwen2-untied", "mistral", "qwen3"])
def test_parameter_count_equals_the_models(config):
    with torch.device("meta"):  # shapes only, no memory
        lm = AutoModelForCausalLM.from_config(config)
        labels = {k: v for k, v in config.to_dict().items() if k not in ("id2label", "label2id")}
        cls = AutoModelForSequenceClassification.from_config(type(config)(**labels, num_labels=1))
    shape = _shape(config)
    assert shape.exact
    assert count_params(shape, "lm") == sum(p.numel() for p in lm.parameters())
    assert count_params(shape, "score") == sum(p.numel() for p in cls.parameters())


def test_qwen25_05b_like_config_counts_its_494m_parameters(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(QWEN25_05B))
    n = count_params(ModelShape.from_config(memory_command.load_config(config_json=str(path))))
    assert abs(n - 494e6) / 494e6 < 0.02, n  # Qwen2.5-0.5B: 494,032,768


def test_generic_fallback_and_defaults():
    gpt2 = ModelShape.from_config({"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257})
    assert not gpt2.exact and gpt2.tie_word_embeddings and gpt2.intermediate_size == 4 * 768
    assert count_params(gpt2) == 12 * 12 * 768**2 + 50257 * 768  # 124M, GPT-2 small without position embeddings
    moe = ModelShape.from_config({**QWEN25_05B, "num_experts": 8})
    assert not moe.exact and "not modelled" in estimate(moe).notes[-1]
    with pytest.raises(ValueError, match="hidden_size"):
        ModelShape.from_config({"model_type": "llama", "vocab_size": 10})


def test_lora_parameter_count_equals_peft():
    from peft import LoraConfig, get_peft_model

    config = LlamaConfig(**SMALL)
    shape = _shape(config)
    for targets in [("q", "v"), LINEARS]:
        model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=8, target_modules=[PEFT_NAMES[t] for t in targets]))
        assert lora_params(shape, targets, 8) == sum(p.numel() for p in model.parameters() if p.requires_grad)


def _saved_bytes_per_layer_token(config, attn, dtype, targets, batch=2, seq=32) -> float:
    """What autograd keeps for one more decoder layer, per token (3 layers minus 2: the first layer differs)."""
    def saved(layers):
        torch.manual_seed(0)
        layered = LlamaConfig(**{**config.to_dict(), "num_hidden_layers": layers}, attn_implementation=attn)
        model = LlamaForCausalLM(layered).to(dtype).train()
        if targets:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=8, lora_dropout=0.0,
                                                     target_modules=[PEFT_NAMES[t] for t in targets]))
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        kept = {}

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params:
                kept[ptr] = t.untyped_storage().nbytes()
            return t

        ids = torch.randint(0, config.vocab_size, (batch, seq))
        mask = torch.ones_like(ids)
        mask[0, -4:] = 0  # a padded batch, as in training
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, attention_mask=mask)
        return sum(kept.values())

    return (saved(3) - saved(2)) / (batch * seq)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("targets", [None, ("q", "v"), ("q", "k", "v", "o"), ("o", "down")],
                         ids=["full", "lora-qv", "lora-qkvo", "lora-o-down"])
def test_activation_bytes_equal_what_autograd_keeps(dtype, attn, targets):
    config = LlamaConfig(**SMALL)
    measured = _saved_bytes_per_layer_token(config, attn, getattr(torch, {"fp32": "float32", "bf16": "bfloat16"}[dtype]),
                                            targets)
    assert activation_bytes_per_token(_shape(config), 32, dtype, targets, 8, attn) == pytest.approx(measured, abs=1)


def test_bytes_per_parameter_by_dtype_and_method():
    shape = ModelShape.from_config(QWEN25_05B)
    p = count_params(shape)
    bf16, fp32 = estimate(shape, dtype="bf16"), estimate(shape, dtype="fp32")
    assert (bf16.weights, bf16.gradients, bf16.optimizer) == (2 * p, 2 * p, 12 * p)  # fp32 master copy + 2 moments
    assert (fp32.weights, fp32.gradients, fp32.optimizer) == (4 * p, 4 * p, 8 * p)
    lora = estimate(shape, method="lora", lora_r=16)
    n = lora_params(shape, ("q", "v"), 16)
    assert lora.gradients == 4 * n and lora.optimizer == 8 * n  # peft keeps adapters in fp32
    assert lora.weights == 2 * p + 4 * n
    qlora = estimate(shape, method="qlora")
    linear = memory.quantisable_params(shape)
    assert qlora.weights == pytest.approx((p - linear) * 2 + linear * memory.NF4_BYTES + 4 * n)
    assert qlora.weights < 0.5 * lora.weights


def test_zero_stages_shard_optimizer_then_gradients_then_weights():
    shape = ModelShape.from_config(QWEN25_05B)
    base = estimate(shape, zero=0, gpus=4)
    z = {stage: estimate(shape, zero=stage, gpus=4) for stage in (1, 2, 3)}
    assert z[1].optimizer == base.optimizer / 4 and z[1].gradients == base.gradients and z[1].weights == base.weights
    assert z[2].optimizer == base.optimizer / 4 and z[2].gradients == base.gradients / 4
    assert z[2].weights == base.weights
    assert (z[3].optimizer, z[3].gradients, z[3].weights) == (base.optimizer / 4, base.gradients / 4, base.weights / 4)
    assert {e.activations for e in z.values()} == {base.activations}  # activations follow the per-device batch
    assert estimate(shape, zero=3, gpus=1).total == estimate(shape, zero=0, gpus=1).total
    # one micro-batch peaks at max(G, A): sharding G helps only once G exceeds A, or with accumulation
    assert base.total > z[1].total >= z[2].total > z[3].total
    accum = [estimate(shape, zero=stage, gpus=4, grad_accum=2).total for stage in range(4)]
    assert accum == sorted(accum, reverse=True) and len(set(accum)) == 4


def test_peak_rule_and_overhead():
    shape = ModelShape.from_config(QWEN25_05B)
    one = estimate(shape, batch=2, seq=256)
    assert one.total == pytest.approx((one.weights + one.optimizer + max(one.gradients, one.activations)) * 1.05)
    accum = estimate(shape, batch=2, seq=256, grad_accum=4)
    assert accum.total == pytest.approx((accum.weights + accum.optimizer + accum.gradients + accum.activations) * 1.05)
    reward = estimate(shape, stage="reward", batch=2, seq=256)
    assert reward.activations < 2 * one.activations  # chosen + rejected, but no vocabulary-sized logits


def test_ppo_topologies_and_what_lora_sharing_saves():
    shape = ModelShape.from_config(QWEN25_05B)
    p_lm, p_cls, h = count_params(shape, "lm"), count_params(shape, "score"), shape.hidden_size
    n = lora_params(shape, ("q", "v"), 16)
    sep = estimate(shape, "ppo", batch=2, seq=256)
    assert sep.topology == "separate"
    assert [(p.params, p.trainable) for p in sep.parts] == [(p_lm, p_lm), (p_cls, p_cls), (p_lm, 0), (p_cls, 0)]
    # without DeepSpeed PPO keeps fp32 weights (bf16 is autocast): 4 + 4 + 8 bytes per trained parameter;
    # the reference is fp32 too and the in-process reward model always loads in fp32
    assert sep.weights == 4 * (2 * p_lm + 2 * p_cls) and sep.optimizer == 8 * (p_lm + p_cls)
    assert sep.gradients == 4 * (p_lm + p_cls)
    lora = estimate(shape, "ppo", method="lora", batch=2, seq=256)
    assert lora.topology == "lora"
    # one base serves policy, critic and reference; the reward model stays a separate frozen model
    assert [(p.params, p.trainable) for p in lora.parts] == [(p_lm, 0), (n, n), (n + h, n + h), (p_cls, 0)]
    assert lora.weights == 2 * p_lm + 4 * (2 * n + h) + 4 * p_cls
    assert lora.separate_total == sep.total and lora.total < sep.total
    shared = estimate(shape, "ppo", topology="shared", batch=2, seq=256)
    assert [(p.params, p.trainable) for p in shared.parts] == [(p_lm + h, p_lm + h), (p_lm, 0), (p_cls, 0)]
    assert shared.activations < sep.activations  # one backbone pass instead of policy + critic
    no_rm = estimate(shape, "ppo", batch=2, seq=256, reward_model=False)
    assert no_rm.weights == sep.weights - 4 * p_cls
    short = estimate(shape, "ppo", batch=2, seq=256, response_len=64)
    assert short.activations < sep.activations  # logits only for the response positions
    for bad in [dict(method="full", topology="lora"), dict(method="lora", topology="separate")]:
        with pytest.raises(ValueError, match="topology"):
            estimate(shape, "ppo", **bad)
    with pytest.raises(ValueError, match="ppo only"):
        estimate(shape, "sft", topology="shared")


def test_critic_free_estimators_hold_no_critic():
    shape = ModelShape.from_config(QWEN25_05B)
    p_lm, p_cls = count_params(shape, "lm"), count_params(shape, "score")
    gae = estimate(shape, "ppo", batch=8, seq=256)
    grpo = estimate(shape, "ppo", batch=8, seq=256, estimator="grpo", samples_per_prompt=4)
    assert [p.name for p in grpo.parts] == ["policy", "reference (frozen)", "reward model (frozen), fp32"]
    assert grpo.optimizer == 8 * p_lm and gae.optimizer == 8 * (p_lm + p_cls)
    assert grpo.activations < gae.activations  # one backbone pass, no critic forward
    # the rollout generates prompts x samples sequences (default: the update's batch); a 7B's KV cache shows it
    big = ModelShape.from_config(LLAMA_7B)
    kv = [estimate(big, "ppo", batch=8, seq=1024, estimator="grpo", samples_per_prompt=4, prompts=prompts)
          for prompts in (2, 8)]
    assert kv[1].rollout_total - kv[0].rollout_total == pytest.approx(
        1.05 * 6 * 4 * 1024 * big.num_layers * 2 * big.hidden_size * 2)  # 24 more sequences, bf16 K and V
    lora = estimate(shape, "ppo", method="lora", batch=8, seq=256, estimator="rloo", samples_per_prompt=2)
    assert [p.name for p in lora.parts] == ["base = reference (frozen)", "policy adapter", "reward model (frozen), fp32"]
    with pytest.raises(ValueError, match="samples-per-prompt >= 2"):
        estimate(shape, "ppo", estimator="grpo")
    with pytest.raises(ValueError, match="ppo only"):
        estimate(shape, "sft", estimator="grpo", samples_per_prompt=2)


# A 7B Llama (Llama-2-7B's shape): the case the issue measured as ~24 GiB low under ZeRO-3 on 8 GPUs
LLAMA_7B = {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 32, "intermediate_size": 11008, "vocab_size": 32000, "tie_word_embeddings": False,
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "architectures": ["LlamaForCausalLM"]}


def test_ppo_zero3_and_fsdp2_count_what_is_sharded_and_what_is_a_full_copy(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(LLAMA_7B))
    shape = ModelShape.from_config(memory_command.load_config(config_json=str(path)))
    p_lm, p_cls = count_params(shape, "lm"), count_params(shape, "score")
    assert abs(p_lm - 6.74e9) / 6.74e9 < 0.01
    run = dict(stage="ppo", gpus=8, batch=4, seq=1024, response_len=512)
    z3 = estimate(shape, zero=3, **run)
    assert [(p.name, p.sharded) for p in z3.parts] == [
        ("policy", True), ("critic", True), ("reference (frozen)", True), ("reward model (frozen), fp32", False)]
    # DeepSpeed's bf16 engine: trained models and the reference (TRL's prepare_deepspeed) in bf16, sharded 8 ways;
    # the reward model a full fp32 copy on every GPU (24.6 GiB of the 30.4)
    assert z3.weights == pytest.approx(2 * (2 * p_lm + p_cls) / 8 + 4 * p_cls)
    assert z3.optimizer == pytest.approx(12 * (p_lm + p_cls) / 8) and z3.gradients == pytest.approx(2 * (p_lm + p_cls) / 8)
    assert 4 * p_cls / GIB > 24  # what counting the reward model as sharded bf16 left out: 24.6 - 1.5 GiB
    # generation gathers the policy and the critic whole (rlhf.distributed.gathered); the reference stays sharded
    assert z3.rollout_weights == pytest.approx(2 * (p_lm + p_cls) + 2 * p_lm / 8 + 4 * p_cls)
    fsdp = estimate(shape, fsdp2=True, **run)
    # FSDP2 shards what fully_shard wraps (policy, critic: fp32, 4 + 4 + 8 bytes); reference and RM are full fp32
    assert [(p.name, p.sharded) for p in fsdp.parts] == [
        ("policy", True), ("critic", True), ("reference (frozen)", False), ("reward model (frozen), fp32", False)]
    assert fsdp.weights == pytest.approx(4 * (p_lm + p_cls) / 8 + 4 * p_lm + 4 * p_cls)
    assert (fsdp.gradients, fsdp.optimizer) == pytest.approx((4 * (p_lm + p_cls) / 8, 8 * (p_lm + p_cls) / 8))
    assert fsdp.rollout_weights == pytest.approx(4 * (p_lm + p_cls) + 4 * p_lm + 4 * p_cls)
    assert fsdp.total > z3.total  # its full fp32 reference alone is 25 GiB per GPU
    with pytest.raises(ValueError, match="fsdp2"):
        estimate(shape, fsdp2=True, topology="shared", **run)
    critic_free = estimate(shape, fsdp2=True, estimator="grpo", samples_per_prompt=4, topology="shared", **run)
    assert [p.name for p in critic_free.parts] == ["policy", "reference (frozen)", "reward model (frozen), fp32"]


def test_verdict_names_the_cheapest_change_that_fits(tmp_path):
    shape = ModelShape.from_config(LLAMA_7B)
    run = dict(stage="ppo", zero=3, gpus=8, batch=4, seq=1024, response_len=512)
    total = estimate(shape, **run).total
    line, _ = memory.fit_verdict(shape, 1.01 * total, **run)
    assert line.startswith("fits: ")
    # each change in turn is the cheapest that fits: a device just big enough for it, and for none before it
    smaller = estimate(shape, **{**run, "batch": 2, "grad_accum": 2}).total
    line, est = memory.fit_verdict(shape, smaller + 1, **run)
    assert "micro-batch 2 with gradient accumulation 2" in line and est.batch == 2
    one = dict(stage="sft", zero=3, gpus=8, batch=1, seq=4096)  # no smaller micro-batch to try
    ckpt = estimate(shape, **{**one, "checkpointing": True}).total
    line, est = memory.fit_verdict(shape, ckpt + 1, **one)
    assert "activation checkpointing" in line and est.checkpointing, line
    sft = dict(stage="sft", batch=1, seq=256, zero=0, gpus=4, checkpointing=True)
    lora = estimate(shape, **{**sft, "method": "lora"}).total
    line, est = memory.fit_verdict(shape, lora + 1, **sft)
    assert "LoRA" in line and est.method == "lora", line
    line, est = memory.fit_verdict(shape, estimate(shape, **{**sft, "zero": 2}).total + 1, **{**sft, "method": "full"})
    assert "LoRA" in line  # LoRA comes before a ZeRO stage: cheaper in communication
    big = dict(sft, method="qlora")  # already LoRA: only ZeRO is left
    z1 = estimate(shape, **{**big, "zero": 1}).total
    line, est = memory.fit_verdict(shape, z1 + 1, **big)
    assert "ZeRO-1" in line and est.zero == 1, line
    line, est = memory.fit_verdict(shape, GIB, **run)
    assert line.startswith("does not fit") and "no single change" in line and est is None
    cfg = tmp_path / "llama.json"
    cfg.write_text(json.dumps(LLAMA_7B))
    out = _cli("--config-json", str(cfg), "--stage", "ppo", "--zero", "3", "--gpus", "8", "--batch", "4", "--seq",
               "1024", "--response-len", "512", "--device-memory", "80")
    assert out.returncode == 0, out.stderr
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("does not fit: ") and "cheapest change that fits: micro-batch 2" in last, out.stdout
    bad = _cli("--config-json", str(cfg), "--device-memory", "0")
    assert bad.returncode == 2 and "--device-memory" in bad.stderr and "Traceback" not in bad.stderr


def _cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "rlhf", "estimate-memory", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_cli_table_json_and_errors(tmp_path):
    cfg = tmp_path / "qwen.json"
    cfg.write_text(json.dumps(QWEN25_05B))
    table = _cli("--config-json", str(cfg), "--stage", "ppo", "--method", "lora", "--batch", "4", "--seq", "1024",
                 "--zero", "2", "--gpus", "2")
    assert table.returncode == 0, table.stderr
    for word in ("base = reference (frozen)", "policy adapter", "critic adapter", "reward model (frozen)", "weights",
                 "gradients", "optimizer", "activations", "total", "separate topology", "lora saves"):
        assert word in table.stdout, (word, table.stdout)
    out = _cli("--config-json", str(cfg), "--stage", "sft", "--dtype", "fp32", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["parts"][0]["params"] == 494_032_768 and data["weights"] == 4 * 494_032_768
    assert data["total"] > data["weights"] + data["optimizer"]
    hub = _cli("--model", "Qwen/Qwen2.5-0.5B")  # the Hub is unreachable (offline) here
    assert hub.returncode == 2 and "--config-json" in hub.stderr and "Traceback" not in hub.stderr


def test_main_in_process(tmp_path, capsys):
    # a local model directory: only config.json is read
    LlamaConfig(**SMALL).save_pretrained(tmp_path / "llama")
    assert memory_command.main(["--model", str(tmp_path / "llama"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["parts"][0]["params"] == count_params(_shape(LlamaConfig(**SMALL)))
    cfg = tmp_path / "qwen.json"
    cfg.write_text(json.dumps(QWEN25_05B))
    assert memory_command.main(["--config-json", str(cfg), "--stage", "ppo", "--method", "full", "--topology", "lora"]) == 2
    assert "topology" in capsys.readouterr().err
    assert memory_command.main(["--config-json", str(cfg), "--lora-targets", "q,x", "--method", "lora"]) == 2
    assert "unknown LoRA targets" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # no abbreviations
        memory_command.main(["--config-json", str(cfg), "--stag", "sft"])


def test_rlhf_estimate_memory_command(tmp_path):
    """The ``rlhf estimate-memory`` subcommand, as users call it."""
    cfg = tmp_path / "qwen.json"
    cfg.write_text(json.dumps(QWEN25_05B))
    out = subprocess.run([sys.executable, "-m", "rlhf", "estimate-memory", "--config-json", str(cfg), "--json"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["parts"][0]["params"] == 494_032_768


def test_load_config_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="no such model directory"):
        memory_command.load_config(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="--model ID_OR_PATH or --config-json"):
        memory_command.load_config()
    raw = tmp_path / "custom.json"  # a model_type transformers does not know: read as it is, generic count
    raw.write_text(json.dumps({"model_type": "my-lm", "hidden_size": 64, "num_hidden_layers": 2,
                               "num_attention_heads": 4, "vocab_size": 100}))
    shape = ModelShape.from_config(memory_command.load_config(config_json=str(raw)))
    assert not shape.exact and count_params(shape) == 12 * 2 * 64**2 + 100 * 64


def test_tiny_demo_resolves_through_the_model_factory(tmp_path, monkeypatch):
    import rlhf.models

    LlamaConfig(**SMALL).save_pretrained(tmp_path)
    monkeypatch.setattr(rlhf.models, "resolve_model_path", lambda name: str(tmp_path) if name == "tiny:demo" else name)
    assert memory_command.load_config("tiny:demo")["hidden_size"] == SMALL["hidden_size"]


# ------------------------------------------------------------------ estimate vs measured peak memory

# One training step of a tiny Llama in a fresh process, Trainer-style (only the loss is kept for
# backward); prints the peak resident memory above the baseline taken after the imports. glibc keeps
# freed chunks in its heaps, so by default peak RSS follows allocation history more than what is alive
# (a LoRA reward step: 494 MB by default, 335 MB with the setting below); MALLOC_MMAP_THRESHOLD_ gives
# every block over 64 KiB its own mapping, returned on free, so peak RSS follows the live tensors --
# what the estimate models, like torch.cuda.max_memory_allocated on a GPU.
# what both measurements start with: imports, /proc/self/status, the spec, the seed, the config
MEASURE_PREAMBLE = textwrap.dedent("""
    import gc, json, sys
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

    spec = json.loads(sys.argv[1])
    torch.manual_seed(0)
    cfg = LlamaConfig(**spec["config"])
""")
MEASURE = MEASURE_PREAMBLE + textwrap.dedent("""
    rows = 2 * spec["batch"] if spec["stage"] == "reward" else spec["batch"]
    ids = torch.randint(1, cfg.vocab_size, (rows, spec["seq"]))
    mask = torch.ones_like(ids)
    mask[0, -16:] = 0  # a padded batch, as the collators make
    ids[0, -16:] = cfg.pad_token_id
    labels = ids.masked_fill(mask == 0, -100)
    gc.collect()
    base = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark: what the imports touched does not count
    cls = LlamaForSequenceClassification if spec["stage"] == "reward" else LlamaForCausalLM
    model = cls(cfg).train()
    if spec["method"] == "lora":
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    # steady state: AdamW's moments exist before the measured step, as in every step after the first
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if spec["stage"] == "reward":
        chosen, rejected = model(input_ids=ids, attention_mask=mask).logits.squeeze(-1).chunk(2)
        loss = -torch.nn.functional.logsigmoid(chosen - rejected).mean()
    else:
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    opt.step()
    print(json.dumps({"peak": status("VmHWM") - base}))
""")
TINY = dict(vocab_size=16384, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=4, tie_word_embeddings=True, pad_token_id=0, num_labels=1)
CASES = {  # (stage, method, attention); batch 8 x seq 128, fp32
    "sft-full": ("sft", "full", "sdpa"),
    "sft-lora": ("sft", "lora", "sdpa"),
    "reward-full-eager": ("reward", "full", "eager"),
}


# One PPO update micro-step with the project's own pieces (rlhf/ppo/actor_critic.py's wrappers, forward_response's
# chunked logprobs and detached entropy, AdamW over policy_parameters + critic_parameters), the frozen reference
# and the fp32 reward model held as the trainer holds them; the same peak-RSS method as above.
MEASURE_PPO = MEASURE_PREAMBLE + textwrap.dedent("""
    from rlhf.ppo.actor_critic import LoraActorCritic, PolicyOnly, SeparateActorCritic, SharedActorCritic
    from rlhf.ppo.rollout import forward_response
    b, lq, lr = spec["batch"], spec["query"], spec["response"]
    query = torch.randint(1, cfg.vocab_size, (b, lq))
    qmask = torch.ones_like(query)
    qmask[0, :16] = 0  # left-padded prompts, as the rollout makes
    response = torch.randint(1, cfg.vocab_size, (b, lr))
    rmask = torch.ones_like(response)
    rmask[0, -16:] = 0
    advantages = torch.randn(b, lr)
    gc.collect()
    base = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    policy = LlamaForCausalLM(cfg)
    topology, critic = spec["topology"], spec["critic"]
    reference = LlamaForCausalLM(cfg).requires_grad_(False) if topology != "lora" else None
    reward_model = LlamaForSequenceClassification(cfg).requires_grad_(False)  # held for the rollout
    head = torch.nn.Linear(cfg.hidden_size, 1, bias=False)
    if topology == "lora":
        from peft import LoraConfig, get_peft_model
        lora = dict(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM")
        peft_model = get_peft_model(policy, LoraConfig(**lora))
        if critic:
            peft_model.add_adapter("critic", LoraConfig(**lora))
        model = LoraActorCritic(peft_model, head if critic else None)
    elif not critic:
        model = PolicyOnly(policy)
    elif topology == "shared":
        model = SharedActorCritic(policy, head)
    else:
        model = SeparateActorCritic(policy, LlamaForSequenceClassification(cfg))
    model.train()
    groups = [{"params": g} for g in (model.policy_parameters(), model.critic_parameters()) if g]
    opt = torch.optim.AdamW(groups, lr=1e-5)
    params = [p for g in groups for p in g["params"]]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    logprobs, values, entropy = forward_response(model, query, qmask, response, rmask, 1.0, with_values=True,
                                                 with_entropy=True)
    loss = -(logprobs * advantages * rmask).sum() / rmask.sum()
    if critic:
        loss = loss + ((values - advantages) ** 2 * rmask).sum() / rmask.sum()
    loss.backward()
    opt.step()
    print(json.dumps({"peak": status("VmHWM") - base}))
""")
PPO_CASES = {  # (method, topology, estimator); batch 8 x (64 prompt + 64 response), fp32, sdpa
    "ppo-separate": ("full", "separate", "gae"),
    "ppo-shared": ("full", "shared", "gae"),
    "ppo-lora": ("lora", "lora", "gae"),
    "ppo-grpo": ("full", "separate", "grpo"),
}


def _measure(script: str, spec: dict, env: dict) -> int:
    out = subprocess.run([sys.executable, "-c", script, json.dumps(spec)], capture_output=True, text=True, env=env,
                         timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])["peak"]


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc to reset peak RSS")
def test_ppo_estimate_within_10_percent_of_measured_peak_memory():
    batch, query, response = 8, 64, 64
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "OMP_NUM_THREADS": "1"}
    shape = ModelShape.from_config({"model_type": "llama", **TINY})
    rows, failures = [], []
    for name, (method, topology, estimator) in PPO_CASES.items():
        spec = {"topology": topology, "critic": estimator == "gae", "batch": batch, "query": query,
                "response": response, "config": {**TINY, "attn_implementation": "sdpa"}}
        measured = _measure(MEASURE_PPO, spec, env)
        est = estimate(shape, "ppo", method, "fp32", batch=batch, seq=query + response, response_len=response,
                       topology=topology, estimator=estimator, samples_per_prompt=2 if estimator != "gae" else 1)
        rows.append(f"{name:<20} measured {measured / 2**20:8.1f} MiB  estimated update {est.update_total / 2**20:8.1f} "
                    f"MiB  ratio {est.update_total / measured:.3f}")
        if abs(est.update_total - measured) > 0.1 * measured:
            failures.append(name)
    print("\n".join(rows))
    assert not failures, "\n".join(rows)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc to reset peak RSS")
def test_sft_and_reward_estimates_within_15_percent_of_measured_peak_memory():
    batch, seq = 8, 128
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "OMP_NUM_THREADS": "1"}
    # the three measurements are independent processes: run them side by side
    procs = {}
    for name, (stage, method, attn) in CASES.items():
        spec = {"stage": stage, "method": method, "batch": batch, "seq": seq,
                "config": {**TINY, "attn_implementation": attn}}
        procs[name] = subprocess.Popen([sys.executable, "-c", MEASURE, json.dumps(spec)], stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True, env=env)
    rows, failures = [], []
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        measured = json.loads(stdout.strip().splitlines()[-1])["peak"]
        stage, method, attn = CASES[name]
        shape = ModelShape.from_config({"model_type": "llama", **TINY})
        est = estimate(shape, stage, method, "fp32", zero=0, gpus=1, batch=batch, seq=seq, attn=attn).total
        rows.append(f"{name:<20} measured {measured / 2**20:8.1f} MiB  estimated {est / 2**20:8.1f} MiB  "
                    f"ratio {est / measured:.2f}")
        # 15%: sft-lora measured 0.89-0.94 of its estimate across runs (RSS of three side-by-side processes
        # moves by ~5%); the PPO topologies hold 10% (test_ppo_estimate_within_10_percent_...)
        if abs(est - measured) > 0.15 * measured:
            failures.append(name)
    print("\n".join(rows))
    assert not failures, "\n".join(rows)

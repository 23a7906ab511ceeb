"""Per-device training-memory estimate for the sft, reward and ppo stages (``rlhf estimate-memory``).

The formula, its symbols and assumptions are in docs/memory.md. The pure arithmetic (``ModelShape`` to
``MemoryEstimate``) comes first; reading a config (local directory, ``tiny:demo``, Hub id, JSON file) and
the command line come last, so the math can be tested without transformers or a network.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field

GIB = 1024**3

# Architectures whose parameters _count_params reproduces exactly (checked against sum(p.numel()) in tests).
LLAMA_LIKE = {"llama", "mistral", "qwen2", "qwen3"}
LINEARS = ("q", "k", "v", "o", "gate", "up", "down")
# peft's default LoRA targets for llama/mistral/qwen2/qwen3, which the project uses when
# lora_target_modules is unset.
DEFAULT_LORA_TARGETS = ("q", "v")
# Bytes per stored parameter. 4-bit NF4 (QLoRA) is half a byte plus its quantisation constants: with
# double quantisation one 8-bit absmax per 64 weights and one fp32 constant per 256 such blocks.
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
# Allocator fragmentation, optimiser temporaries, autograd bookkeeping: a fraction of everything else.
OVERHEAD_FRACTION = 0.05


@dataclass(frozen=True)
class ModelShape:
    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    attention_bias: bool = False  # q, k, v (and o for llama) projections carry a bias
    qk_norm: bool = False  # qwen3: RMSNorm over each head of q and k
    exact: bool = True  # False: generic 12*L*h^2 + V*h fallback

    @classmethod
    def from_config(cls, cfg: dict) -> ModelShape:
        """From a config dict (``PretrainedConfig.to_dict()`` or a raw config.json)."""
        if isinstance(cfg.get("text_config"), dict):  # multimodal wrappers: the language model's config
            cfg = {**cfg["text_config"], "model_type": cfg["text_config"].get("model_type", cfg.get("model_type"))}

        def pick(*names, default=None):
            for name in names:
                if cfg.get(name) is not None:
                    return cfg[name]
            if default is None:
                raise ValueError(f"model config lacks {' / '.join(names)}")
            return default

        model_type = str(cfg.get("model_type", "unknown"))
        h = int(pick("hidden_size", "n_embd", "d_model"))
        heads = int(pick("num_attention_heads", "n_head", "num_heads"))
        exact = model_type in LLAMA_LIKE
        return cls(
            model_type=model_type, hidden_size=h,
            num_layers=int(pick("num_hidden_layers", "n_layer", "num_layers")),
            num_heads=heads, num_kv_heads=int(pick("num_key_value_heads", default=heads)),
            head_dim=int(pick("head_dim", default=h // heads)),
            intermediate_size=int(pick("intermediate_size", "n_inner", "ffn_dim", default=4 * h)),
            vocab_size=int(pick("vocab_size")),
            # transformers' base default is tied; llama-like classes default to untied
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", not exact)),
            attention_bias=bool(cfg.get("attention_bias", False)) or model_type == "qwen2",
            qk_norm=model_type == "qwen3", exact=exact,
        )


def linear_dims(s: ModelShape) -> dict[str, tuple[int, int]]:
    """(in, out) features of each projection in one decoder layer."""
    q, kv = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
    h, inter = s.hidden_size, s.intermediate_size
    return {"q": (h, q), "k": (h, kv), "v": (h, kv), "o": (q, h), "gate": (h, inter), "up": (h, inter),
            "down": (inter, h)}


def count_params(s: ModelShape, head: str = "lm") -> int:
    """Parameters of a causal LM (head='lm') or of a one-label sequence classifier (head='score')."""
    h, v = s.hidden_size, s.vocab_size
    if not s.exact:  # the usual GPT estimate: 4h^2 attention + 8h^2 MLP per layer, plus embeddings
        body = 12 * s.num_layers * h * h + v * h
    else:
        dims = linear_dims(s)
        layer = sum(i * o for i, o in dims.values()) + 2 * h  # projections + two RMSNorms
        if s.attention_bias:
            layer += dims["q"][1] + 2 * dims["k"][1] + (h if s.model_type != "qwen2" else 0)
        if s.qk_norm:
            layer += 2 * s.head_dim
        body = v * h + s.num_layers * layer + h  # embeddings, layers, final norm
    if head == "score":
        return body + h  # score head, no bias; no LM head
    return body + (0 if s.tie_word_embeddings else v * h)


def quantisable_params(s: ModelShape) -> int:
    """Weights of the decoder's linear layers: what bitsandbytes stores in 4 bits (not embeddings/head)."""
    if not s.exact:
        return 12 * s.num_layers * s.hidden_size**2
    return s.num_layers * sum(i * o for i, o in linear_dims(s).values())


def lora_params(s: ModelShape, targets=DEFAULT_LORA_TARGETS, r: int = 16) -> int:
    """One adapter: A (r x in) and B (out x r) on each targeted projection of every layer."""
    dims = linear_dims(s)
    return s.num_layers * sum(r * (dims[t][0] + dims[t][1]) for t in targets)


def activation_bytes_per_token(s: ModelShape, seq: int, dtype: str, kept: tuple[str, ...], lora_r: int = 0,
                               attn: str = "sdpa") -> float:
    """Bytes autograd keeps per token in one decoder layer, itemised for an HF llama-like layer.

    ``kept``: the projections whose input is kept -- those with a trained weight or an adapter (a frozen
    linear needs only its weight to pass gradients down). Full fine-tuning keeps all seven and the norm
    inputs; LoRA only the adapted ones. Counted from what torch saves (tests check the totals).
    """
    e = DTYPE_BYTES[dtype]
    h, inter, qd = s.hidden_size, s.intermediate_size, s.num_heads * s.head_dim
    full = set(kept) == set(LINEARS)
    total = 0.0
    for consumers in (("q", "k", "v"), ("gate", "up")):  # input and post-attention RMSNorm
        total += 4 * h  # HF upcasts the residual to fp32 for the variance and keeps it
        total += e * h if full else 0  # normalised input, for the norm weight's gradient
        total += e * h if any(c in kept for c in consumers) else 0  # norm output, for the projections
    total += 3 * e * qd  # rotated q and k for QK^T, v for PV (k, v repeated to all heads: GQA saves none)
    total += e * qd if "o" in kept else 0
    total += 3 * e * inter  # gate output (SiLU input), SiLU output, up output (both kept by the product)
    total += e * inter if "down" in kept else 0
    total += 4 * lora_r * sum(t in kept for t in LINEARS) if not full else 0  # adapters' r-dim outputs (fp32)
    if attn == "eager":  # softmax probabilities, fp32, plus the half-precision copy PV reads
        total += (4 + (e if e != 4 else 0)) * s.num_heads * seq
    else:  # fused attention (sdpa / flash) keeps only a log-sum-exp per head
        total += 4 * s.num_heads
    return total


def logits_bytes_per_token(s: ModelShape, dtype: str) -> float:
    """LM head output (e bytes), its fp32 log-softmax kept by the loss, and two fp32 gradients in backward."""
    return (DTYPE_BYTES[dtype] + 12) * s.vocab_size


@dataclass
class Part:
    """One set of parameters held on a device (a model, a frozen base, an adapter)."""

    name: str
    params: int
    trainable: int
    bits4: int = 0  # of params, stored as NF4


@dataclass
class MemoryEstimate:
    stage: str
    method: str
    dtype: str
    zero: int
    gpus: int
    batch: int
    seq: int
    topology: str | None
    parts: list[Part]
    weights: float
    gradients: float
    optimizer: float
    activations: float
    overhead: float
    total: float
    notes: list[str] = field(default_factory=list)
    separate_total: float | None = None  # ppo lora/shared: the same run with the separate topology

    def to_dict(self) -> dict:
        return asdict(self)


def _trainable_bytes(dtype: str, adapter: bool) -> tuple[int, int]:
    """(gradient, optimiser) bytes per trainable parameter.

    AdamW keeps two fp32 moments (8 bytes). Full training in bf16/fp16 keeps half-precision gradients
    and an fp32 master copy of the weights with the optimiser (2 + 4 + 8); peft keeps adapters in fp32,
    so they train like fp32 parameters (4 + 8).
    """
    if dtype == "fp32" or adapter:
        return 4, 8
    return 2, 12


def estimate(shape: ModelShape, stage: str = "sft", method: str = "full", dtype: str = "bf16", zero: int = 0,
             gpus: int = 1, batch: int = 1, seq: int = 512, lora_r: int = 16,
             lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS, topology: str | None = None,
             attn: str = "sdpa", reward_model: bool = True) -> MemoryEstimate:
    """Per-device bytes for one training step of ``stage`` (docs/memory.md has the formula)."""
    if stage not in ("sft", "reward", "ppo") or method not in ("full", "lora", "qlora"):
        raise ValueError(f"unknown stage/method {stage}/{method}")
    if not 0 <= zero <= 3 or gpus < 1 or batch < 1 or seq < 1:
        raise ValueError("need 0 <= zero <= 3, gpus >= 1, batch >= 1, seq >= 1")
    unknown = set(lora_targets) - set(LINEARS)
    if unknown:
        raise ValueError(f"unknown LoRA targets {sorted(unknown)}; choose from {', '.join(LINEARS)}")
    lora = method != "full"
    if stage == "ppo":
        topology = topology or ("lora" if lora else "separate")
        if (topology == "lora") != lora:
            raise ValueError("ppo: topology 'lora' goes with --method lora/qlora, 'separate'/'shared' with full")
    elif topology is not None:
        raise ValueError("--topology applies to --stage ppo only")

    h = shape.hidden_size
    p_lm, p_cls = count_params(shape, "lm"), count_params(shape, "score")
    p_adapter = lora_params(shape, lora_targets, lora_r) if lora else 0
    bits4 = quantisable_params(shape) if method == "qlora" else 0
    kept = tuple(lora_targets) if lora else LINEARS
    layer_tok = shape.num_layers * activation_bytes_per_token(shape, seq, dtype, kept, lora_r if lora else 0, attn)
    # final norm + what the head reads, then logits for heads over the vocabulary
    lm_tok = layer_tok + (4 + 2 * DTYPE_BYTES[dtype]) * h + logits_bytes_per_token(shape, dtype)
    cls_tok = layer_tok + (4 + 2 * DTYPE_BYTES[dtype]) * h
    tokens = batch * seq
    notes = []

    if stage == "sft":
        parts = [Part("base (frozen)", p_lm, 0, bits4), Part("adapter", p_adapter, p_adapter)] if lora \
            else [Part("model", p_lm, p_lm)]
        act = tokens * lm_tok
    elif stage == "reward":  # RewardTrainer stacks chosen and rejected: 2*batch sequences per step
        parts = [Part("base (frozen)", p_cls - h, 0, bits4), Part("adapter + score head", p_adapter + h,
                                                                  p_adapter + h)] if lora \
            else [Part("model", p_cls, p_cls)]
        act = 2 * tokens * cls_tok
    else:
        if topology == "separate":
            parts = [Part("policy", p_lm, p_lm), Part("reference (frozen)", p_lm, 0), Part("critic", p_cls, p_cls)]
            act = tokens * (lm_tok + cls_tok)  # policy and critic forwards live until one backward
        elif topology == "shared":
            parts = [Part("policy + value head", p_lm + h, p_lm + h), Part("reference (frozen)", p_lm, 0)]
            act = tokens * lm_tok  # one backbone pass feeds both heads
        else:
            parts = [Part("base = reference (frozen)", p_lm, 0, bits4), Part("policy adapter", p_adapter, p_adapter),
                     Part("critic adapter + value head", p_adapter + h, p_adapter + h)]
            act = tokens * (lm_tok + cls_tok)  # the base runs twice: policy adapter, then critic adapter
        if reward_model:
            parts.append(Part("reward model (frozen)", p_cls, 0))
        notes.append("ppo: rollout (generation KV cache) is not added; it precedes the update and is smaller "
                     "at equal batch and length")

    weights = grads = optim = 0.0
    wbytes = DTYPE_BYTES[dtype]
    for p in parts:
        adapter = lora and p.trainable > 0
        weights += (p.params - p.bits4) * (4 if adapter else wbytes) + p.bits4 * NF4_BYTES
        g, o = _trainable_bytes(dtype, adapter)
        grads += p.trainable * g
        optim += p.trainable * o
    # ZeRO over the data-parallel group: 1 shards optimiser states, 2 also gradients, 3 also weights
    optim /= gpus if zero >= 1 else 1
    grads /= gpus if zero >= 2 else 1
    weights /= gpus if zero >= 3 else 1
    overhead = OVERHEAD_FRACTION * (weights + grads + optim + act)
    if not shape.exact:
        notes.append(f"model_type {shape.model_type!r}: generic parameter count 12*L*h^2 + V*h (approximate)")
    est = MemoryEstimate(stage, method, dtype, zero, gpus, batch, seq, topology, parts, weights, grads, optim, act,
                         overhead, weights + grads + optim + act + overhead, notes)
    if stage == "ppo" and topology != "separate":
        est.separate_total = estimate(shape, "ppo", "full", dtype, zero, gpus, batch, seq, attn=attn,
                                      topology="separate", reward_model=reward_model).total
    return est


def format_table(est: MemoryEstimate) -> str:
    """The estimate as a plain-text table, GiB per device."""
    def gib(x: float) -> str:
        return f"{x / GIB:10.3f}"

    topo = f", topology {est.topology}" if est.topology else ""
    lines = [f"stage {est.stage}, method {est.method}{topo}, {est.dtype}, ZeRO-{est.zero} over {est.gpus} GPU(s), "
             f"batch {est.batch} x seq {est.seq} per device",
             f"{'held on each device':<32}{'params':>14}{'trainable':>14}"]
    lines += [f"  {p.name:<30}{p.params:>14,}{p.trainable:>14,}" for p in est.parts]
    lines.append(f"{'component':<32}{'GiB/device':>10}")
    for name in ("weights", "gradients", "optimizer", "activations", "overhead"):
        lines.append(f"  {name:<30}{gib(getattr(est, name))}")
    lines.append(f"  {'total':<30}{gib(est.total)}")
    if est.separate_total is not None:
        saved = est.separate_total - est.total
        lines.append(f"  {'separate topology (full)':<30}{gib(est.separate_total)}   ({est.topology} saves "
                     f"{saved / GIB:.3f} GiB, {100 * saved / est.separate_total:.0f}%)")
    lines += [f"note: {n}" for n in est.notes]
    return "\n".join(lines)


# ---------------------------------------------------------------- I/O: configs and the command line


def load_config(model: str | None = None, config_json: str | None = None) -> dict:
    """A model config as a dict, without downloading weights.

    ``config_json``: a config.json file (offline). ``model``: ``tiny:demo``, a local directory, or a Hub
    id (only config.json is fetched). Class defaults are filled in through transformers when it knows
    the model_type, so a config.json without ``tie_word_embeddings`` reads as its class declares.
    """
    if config_json:
        with open(config_json, encoding="utf-8") as f:
            raw = json.load(f)
        try:
            from transformers import AutoConfig

            return AutoConfig.for_model(**raw).to_dict()
        except (ValueError, KeyError, TypeError):  # unknown model_type: take the file as it is
            return raw
    if not model:
        raise ValueError("give --model ID_OR_PATH or --config-json FILE")
    from transformers import AutoConfig

    if model.startswith("tiny:"):
        from .models import resolve_model_path

        model = resolve_model_path(model)
    try:
        config = AutoConfig.from_pretrained(model)
    except Exception as e:  # offline, gated, typo: say what to do instead
        raise ValueError(
            f"could not read the config of {model!r} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "pass a local model directory as --model, or a config.json with --config-json FILE"
        ) from e
    get_text = getattr(config, "get_text_config", None)
    return (get_text() if get_text else config).to_dict()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlhf estimate-memory", allow_abbrev=False,
                                description="Per-device memory of one training step, from the model config "
                                            "(formula: docs/memory.md).")
    p.add_argument("--model", help="Hub id, local model directory, or tiny:demo (only the config is read)")
    p.add_argument("--config-json", help="a config.json to read instead of --model (offline)")
    p.add_argument("--stage", choices=["sft", "reward", "ppo"], default="sft")
    p.add_argument("--method", choices=["full", "lora", "qlora"], default="full")
    p.add_argument("--zero", type=int, choices=[0, 1, 2, 3], default=0, help="DeepSpeed ZeRO stage")
    p.add_argument("--gpus", type=int, default=1, help="data-parallel devices ZeRO shards over")
    p.add_argument("--batch", type=int, default=1, help="per-device micro-batch (reward: pairs)")
    p.add_argument("--seq", type=int, default=512, help="tokens per sequence (ppo: prompt + response)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-targets", default=",".join(DEFAULT_LORA_TARGETS),
                   help=f"comma-separated, from {','.join(LINEARS)} (default: peft's q,v); 'all' for every one")
    p.add_argument("--topology", choices=["separate", "lora", "shared"], help="ppo (default: lora for LoRA methods, "
                                                                           "else separate)")
    p.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa",
                   help="attention kernel: eager keeps the heads x seq x seq probabilities")
    p.add_argument("--no-reward-model", action="store_true", help="ppo scored by a function or API: no RM held")
    p.add_argument("--json", action="store_true", help="print the estimate as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.gpus < 1 or args.batch < 1 or args.seq < 1 or args.lora_r < 1:
        print("error: --gpus, --batch, --seq and --lora-r must be positive", file=sys.stderr)
        return 2
    targets = LINEARS if args.lora_targets == "all" else tuple(t.strip() for t in args.lora_targets.split(","))
    try:
        shape = ModelShape.from_config(load_config(args.model, args.config_json))
        est = estimate(shape, args.stage, args.method, args.dtype, args.zero, args.gpus, args.batch, args.seq,
                       args.lora_r, targets, args.topology, args.attn, not args.no_reward_model)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(est.to_dict(), indent=2) if args.json else format_table(est))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Per-device training-memory estimate for the sft, reward and ppo stages (``rlhf estimate-memory``).

The formula, its symbols and assumptions are in docs/memory.md. This module is the pure arithmetic
(``ModelShape`` to ``MemoryEstimate``), testable without transformers or a network; reading a model's
config and the command line are ``rlhf.memory_command``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

GIB = 1024**3

# Architectures whose parameters count_params reproduces exactly (checked against sum(p.numel()) in tests).
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
        # mixture-of-experts layers hold many MLPs: not modelled, so such configs take the rough fallback
        exact = model_type in LLAMA_LIKE and not (cfg.get("num_local_experts") or cfg.get("num_experts"))
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


def activation_bytes_per_token(s: ModelShape, seq: int, dtype: str, lora_targets: tuple[str, ...] | None = None,
                               lora_r: int = 16, attn: str = "sdpa") -> float:
    """Bytes autograd keeps per token in one decoder layer, itemised for an HF llama-like layer.

    ``lora_targets``: None for full fine-tuning, else the adapted projections. A linear layer keeps its
    input only when its weight trains or it carries an adapter (a frozen one needs only its weight to
    pass the gradient down), so LoRA keeps less. Counted from what torch saves; tests compare the two.
    """
    e = DTYPE_BYTES[dtype]
    h, inter = s.hidden_size, s.intermediate_size
    qd = s.num_heads * s.head_dim
    full = lora_targets is None
    kept = LINEARS if full else lora_targets

    def inputs(consumers, size):
        """Bytes kept for the input these projections read."""
        n = sum(c in kept for c in consumers)
        if n == 0:
            return 0
        # peft casts the input to each fp32 adapter's dtype: one fp32 copy per adapter in half precision
        return e * size if full or e == 4 else 4 * size * n

    total = 0.0
    for consumers in (("q", "k", "v"), ("gate", "up")):  # input and post-attention RMSNorm
        total += 4 * h + 4  # HF upcasts the residual to fp32 for the variance, keeps it and 1/rms
        total += e * h if full else 0  # normalized input, for the norm weight's gradient
        total += inputs(consumers, h)
    # rotated q and k, and v: k and v repeated to all query heads (GQA saves nothing once a padding mask
    # is passed; transformers hands sdpa the kv heads only for unmasked batches)
    total += 3 * e * qd
    if attn == "eager":  # fp32 softmax probabilities, plus the half-precision copy PV reads
        total += (4 + (e if e != 4 else 0)) * s.num_heads * seq + inputs(("o",), qd)
    else:  # sdpa keeps its output (o_proj shares it), a log-sum-exp per head, and the padding mask it
        # turns into an additive bias per call: seq values per token, shared by the heads
        total += e * qd + 4 * s.num_heads + e * seq + (inputs(("o",), qd) if not full and e != 4 else 0)
    total += 3 * e * inter  # gate output (SiLU input), SiLU output, up output (both kept by the product)
    total += inputs(("down",), inter)
    total += 0 if full else 4 * lora_r * len(kept)  # each adapter's r-dim output (fp32)
    return total


def logits_bytes_per_token(s: ModelShape) -> float:
    """The loss's fp32 log-softmax (kept for backward) and the two fp32 gradients backward makes from it.

    The logits themselves (and their fp32 upcast) are dropped before backward by Trainer-style loops,
    which keep only the loss; a loop that holds ``outputs.logits`` through backward adds e*V more.
    """
    return 12 * s.vocab_size


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
    grad_accum: int
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
             attn: str = "sdpa", reward_model: bool = True, grad_accum: int = 1,
             response_len: int | None = None) -> MemoryEstimate:
    """Per-device bytes for one training step of ``stage`` (docs/memory.md has the formula)."""
    if stage not in ("sft", "reward", "ppo") or method not in ("full", "lora", "qlora"):
        raise ValueError(f"unknown stage/method {stage}/{method}")
    if not 0 <= zero <= 3 or min(gpus, batch, seq, lora_r, grad_accum) < 1:
        raise ValueError("need 0 <= zero <= 3 and gpus, batch, seq, lora_r, grad_accum >= 1")
    unknown = set(lora_targets) - set(LINEARS)
    if unknown:
        raise ValueError(f"unknown LoRA targets {sorted(unknown)}; choose from {', '.join(LINEARS)}")
    lora = method != "full"
    if stage == "ppo":
        topology = topology or ("lora" if lora else "separate")
        if (topology == "lora") != lora:
            raise ValueError("ppo: topology 'lora' goes with --method lora/qlora, 'separate'/'shared' with full")
    elif topology is not None or response_len is not None:
        raise ValueError("--topology and --response-len apply to --stage ppo only")
    if response_len is not None and response_len < 1:
        raise ValueError("response_len must be >= 1")

    h = shape.hidden_size
    p_lm, p_cls = count_params(shape, "lm"), count_params(shape, "score")
    p_adapter = lora_params(shape, lora_targets, lora_r) if lora else 0
    bits4 = quantisable_params(shape) if method == "qlora" else 0
    layer_tok = shape.num_layers * activation_bytes_per_token(shape, seq, dtype, tuple(lora_targets) if lora else None,
                                                              lora_r, attn)
    cls_tok = layer_tok + (4 + 2 * DTYPE_BYTES[dtype]) * h  # + the final norm and what the head reads
    tokens = batch * seq
    # the LM head's logits; ppo computes them for the response positions only (logits_to_keep)
    logits = batch * (min(response_len, seq) if stage == "ppo" and response_len else seq) \
        * logits_bytes_per_token(shape)
    notes = []

    if stage == "sft":
        parts = [Part("base (frozen)", p_lm, 0, bits4), Part("adapter", p_adapter, p_adapter)] if lora \
            else [Part("model", p_lm, p_lm)]
        act = tokens * cls_tok + logits
    elif stage == "reward":  # RewardTrainer stacks chosen and rejected: 2*batch sequences per step
        parts = [Part("base (frozen)", p_cls - h, 0, bits4), Part("adapter + score head", p_adapter + h,
                                                                  p_adapter + h)] if lora \
            else [Part("model", p_cls, p_cls)]
        act = 2 * tokens * cls_tok
    else:
        if topology == "separate":
            parts = [Part("policy", p_lm, p_lm), Part("reference (frozen)", p_lm, 0), Part("critic", p_cls, p_cls)]
            act = 2 * tokens * cls_tok + logits  # policy and critic forwards live until one backward
        elif topology == "shared":
            parts = [Part("policy + value head", p_lm + h, p_lm + h), Part("reference (frozen)", p_lm, 0)]
            act = tokens * cls_tok + logits  # one backbone pass feeds both heads
        else:
            parts = [Part("base = reference (frozen)", p_lm, 0, bits4), Part("policy adapter", p_adapter, p_adapter),
                     Part("critic adapter + value head", p_adapter + h, p_adapter + h)]
            act = 2 * tokens * cls_tok + logits  # the base runs twice: policy adapter, then critic adapter
        if reward_model:
            parts.append(Part("reward model (frozen)", p_cls, 0))
        notes.append(f"ppo: logits for {min(response_len or seq, seq)} response tokens per sequence; rollout "
                     "(generation KV cache) is not added: it precedes the update and is smaller at equal batch/length")

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
    # Backward frees each layer's activations as it produces that layer's gradients, so one micro-batch
    # peaks near max(G, A) (measured); with gradient accumulation the gradients of the previous
    # micro-batches are held through the next forward and backward: G + A.
    peak = weights + optim + (grads + act if grad_accum > 1 else max(grads, act))
    overhead = OVERHEAD_FRACTION * peak
    if not shape.exact:
        notes.append(f"model_type {shape.model_type!r}: generic parameter count 12*L*h^2 + V*h (approximate; "
                     "mixture-of-experts layers are not modelled)")
    est = MemoryEstimate(stage, method, dtype, zero, gpus, batch, seq, grad_accum, topology, parts, weights, grads,
                         optim, act, overhead, peak + overhead, notes)
    if stage == "ppo" and topology != "separate":
        est.separate_total = estimate(shape, "ppo", "full", dtype, zero, gpus, batch, seq, attn=attn,
                                      topology="separate", reward_model=reward_model, grad_accum=grad_accum,
                                      response_len=response_len).total
    return est

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


# The in-process reward model (rlhf.ppo.rewards.LocalRewardModel -> reward_models.scoring.RewardScorer) loads
# in fp32 on every process and no engine wraps it: a full fp32 copy per device whatever the policy's sharding.
REWARD_MODEL_BYTES = 4
# rlhf.ppo.losses.CHUNK_BYTES: the chunked logprob/entropy temporaries stay within a few such chunks (or a few
# fp32 copies of the logits, when they are smaller than one chunk)
LOGPROB_CHUNK_BYTES = 64 << 20
CRITIC_FREE = ("grpo", "dr_grpo", "rloo", "reinforce_pp")
ESTIMATORS = ("gae", *CRITIC_FREE)


@dataclass
class Part:
    """One set of parameters held on a device (a model, a frozen base, an adapter).

    ``sharded``: whether ZeRO-3 / FSDP2 spread it over the devices (False: a full copy on each);
    ``bytes_per_param``: its storage when it differs from the run's (None: the run's).
    """

    name: str
    params: int
    trainable: int
    bits4: int = 0  # of params, stored as NF4
    sharded: bool = True
    bytes_per_param: int | None = None


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
    fsdp2: bool = False
    gathered: float = 0.0  # ZeRO-3/FSDP2: the unit a forward gathers at a time (embeddings + head, two layers)
    checkpointing: bool = False
    estimator: str = "gae"
    update_total: float | None = None  # ppo: the update's peak (total is the larger phase)
    rollout_total: float | None = None  # ppo: generation and the no-grad recompute forwards
    rollout_weights: float | None = None  # ppo: weights held while generating (ZeRO-3/FSDP2 gather the trained)

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


def _ppo_parts(topology: str, critic: bool, p_lm: int, p_cls: int, h: int, p_adapter: int, bits4: int,
               reward_model: bool, zero: int) -> list[Part]:
    """The models PPO holds per device, as rlhf/ppo/actor_critic.py builds and rlhf/ppo/trainer.py places them:
    the trained wrapper is sharded by ZeRO-3 and FSDP2; the reference goes through TRL's prepare_deepspeed
    (sharded under ZeRO-3) but is a full copy under FSDP2 and DDP; the reward model is a full fp32 copy."""
    ref_sharded = zero == 3
    if topology == "lora":
        parts = [Part("base = reference (frozen)", p_lm, 0, bits4), Part("policy adapter", p_adapter, p_adapter)]
        if critic:
            parts.append(Part("critic adapter + value head", p_adapter + h, p_adapter + h))
    else:
        head = h if critic and topology == "shared" else 0
        parts = [Part("policy + value head" if head else "policy", p_lm + head, p_lm + head),
                 Part("reference (frozen)", p_lm, 0, sharded=ref_sharded)]
        if critic and topology == "separate":
            parts.insert(1, Part("critic", p_cls, p_cls))
    if reward_model:
        parts.append(Part("reward model (frozen), fp32", p_cls, 0, sharded=False,
                          bytes_per_param=REWARD_MODEL_BYTES))
    return parts


def estimate(shape: ModelShape, stage: str = "sft", method: str = "full", dtype: str = "bf16", zero: int = 0,
             gpus: int = 1, batch: int = 1, seq: int = 512, lora_r: int = 16,
             lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS, topology: str | None = None,
             attn: str = "sdpa", reward_model: bool = True, grad_accum: int = 1,
             response_len: int | None = None, estimator: str = "gae", samples_per_prompt: int = 1,
             prompts: int | None = None, rollout_forward_batch: int | None = None, fsdp2: bool = False,
             checkpointing: bool = False) -> MemoryEstimate:
    """Per-device bytes for one training step of ``stage`` (docs/memory.md has the formula).

    PPO: ``batch`` is the update's micro-batch in sequences; ``prompts`` the prompts per device per step
    (default: ``batch / samples_per_prompt``), each sampled ``samples_per_prompt`` times in the rollout;
    ``rollout_forward_batch`` the sequences per no-grad recompute forward (default: ``batch``).
    """
    if stage not in ("sft", "reward", "ppo") or method not in ("full", "lora", "qlora"):
        raise ValueError(f"unknown stage/method {stage}/{method}")
    if not 0 <= zero <= 3 or min(gpus, batch, seq, lora_r, grad_accum, samples_per_prompt) < 1:
        raise ValueError("need 0 <= zero <= 3 and gpus, batch, seq, lora_r, grad_accum, samples_per_prompt >= 1")
    unknown = set(lora_targets) - set(LINEARS)
    if unknown:
        raise ValueError(f"unknown LoRA targets {sorted(unknown)}; choose from {', '.join(LINEARS)}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; choose from {', '.join(ESTIMATORS)}")
    lora = method != "full"
    if stage == "ppo":
        topology = topology or ("lora" if lora else "separate")
        if (topology == "lora") != lora:
            raise ValueError("ppo: topology 'lora' goes with --method lora/qlora, 'separate'/'shared' with full")
        if estimator in ("grpo", "dr_grpo", "rloo") and samples_per_prompt < 2:
            raise ValueError(f"estimator {estimator} compares the replies to one prompt: set --samples-per-prompt >= 2")
        if fsdp2 and (topology == "lora" or topology == "shared" and estimator == "gae"):
            raise ValueError(f"--fsdp2: PPO supports topology separate and the critic-free estimators, not {topology} "
                             "(rlhf/ppo/trainer.py refuses it); use --zero 3")
    elif topology is not None or response_len is not None or estimator != "gae" or samples_per_prompt != 1 \
            or prompts is not None or rollout_forward_batch is not None:
        raise ValueError("--topology, --response-len, --estimator, --samples-per-prompt, --prompts and "
                         "--rollout-forward-batch apply to --stage ppo only")
    if fsdp2 and zero:
        raise ValueError("--fsdp2 replaces DeepSpeed: use it with --zero 0")
    if response_len is not None and response_len < 1:
        raise ValueError("response_len must be >= 1")

    h = shape.hidden_size
    p_lm, p_cls = count_params(shape, "lm"), count_params(shape, "score")
    p_adapter = lora_params(shape, lora_targets, lora_r) if lora else 0
    bits4 = quantisable_params(shape) if method == "qlora" else 0
    # PPO keeps trained and reference weights in fp32 (dtype float32; bf16 is autocast) unless DeepSpeed's bf16
    # engine casts them or the lora topology's frozen base takes the dtype (rlhf/config.py refuses the rest)
    store = dtype if stage != "ppo" or zero >= 1 or lora else "fp32"
    targets = tuple(lora_targets) if lora else None
    layer_tok = shape.num_layers * activation_bytes_per_token(shape, seq, dtype, targets, lora_r, attn)
    if checkpointing:  # each layer keeps its input; backward recomputes one layer at a time
        layer_tok = shape.num_layers * DTYPE_BYTES[store] * h + layer_tok / shape.num_layers
    cls_tok = layer_tok + (4 + 2 * DTYPE_BYTES[dtype]) * h  # + the final norm and what the head reads
    tokens = batch * seq
    notes = []
    critic = estimator == "gae"
    resp = min(response_len or seq, seq)

    if stage == "sft":
        parts = [Part("base (frozen)", p_lm, 0, bits4), Part("adapter", p_adapter, p_adapter)] if lora \
            else [Part("model", p_lm, p_lm)]
        act = tokens * cls_tok + tokens * logits_bytes_per_token(shape)
    elif stage == "reward":  # RewardTrainer stacks chosen and rejected: 2*batch sequences per step
        parts = [Part("base (frozen)", p_cls - h, 0, bits4), Part("adapter + score head", p_adapter + h,
                                                                  p_adapter + h)] if lora \
            else [Part("model", p_cls, p_cls)]
        act = 2 * tokens * cls_tok
    else:
        parts = _ppo_parts(topology, critic, p_lm, p_cls, h, p_adapter, bits4, reward_model, zero)
        # the update keeps the response's logits (T+1 positions, logits_to_keep) for the chunked logprob's
        # backward, then their gradient; the chunks' fp32 temporaries stay within a few chunks
        rows = batch * (resp + 1) * shape.vocab_size
        logits = rows * 2 * DTYPE_BYTES[dtype] + 4 * min(LOGPROB_CHUNK_BYTES, 4 * rows)
        # separate: policy and critic forwards live until one backward; lora: the base runs once per adapter;
        # shared and critic-free: one backbone pass
        passes = 2 if critic and topology in ("separate", "lora") else 1
        act = passes * tokens * cls_tok + logits
        notes.append(f"ppo: logits for {resp} response tokens per sequence; the reward model is a full fp32 copy on "
                     "every device (rlhf/ppo/rewards.py): serve it over HTTP (reward_url) to drop it")
        if not critic:
            notes.append(f"estimator {estimator}: no critic; {samples_per_prompt} samples per prompt")

    weights = grads = optim = 0.0
    shards_weights = zero >= 3 or fsdp2
    for p in parts:
        adapter = lora and p.trainable > 0
        bytes_pp = p.bytes_per_param or (4 if adapter else DTYPE_BYTES[store])
        w = (p.params - p.bits4) * bytes_pp + p.bits4 * NF4_BYTES
        weights += w / gpus if shards_weights and p.sharded else w
        g, o = _trainable_bytes(store, adapter)
        grads += p.trainable * g
        optim += p.trainable * o
    # ZeRO over the data-parallel group: 1 shards optimiser states, 2 also gradients, 3 also weights;
    # FSDP2 shards all three of what it wraps (the trained models)
    optim /= gpus if zero >= 1 or fsdp2 else 1
    grads /= gpus if zero >= 2 or fsdp2 else 1
    gathered = 0.0
    if shards_weights and gpus > 1:  # the forward gathers a unit at a time: the embeddings/head root, a layer
        layer = (p_lm - (1 if shape.tie_word_embeddings else 2) * shape.vocab_size * h - h) / shape.num_layers
        gathered = DTYPE_BYTES[store] * ((p_lm - shape.num_layers * layer) + 2 * layer) * (1 - 1 / gpus)
    # Backward frees each layer's activations as it produces that layer's gradients, so one micro-batch
    # peaks near max(G, A) (measured); with gradient accumulation the gradients of the previous
    # micro-batches are held through the next forward and backward: G + A.
    peak = weights + gathered + optim + (grads + act if grad_accum > 1 else max(grads, act))
    overhead = OVERHEAD_FRACTION * peak
    if not shape.exact:
        notes.append(f"model_type {shape.model_type!r}: generic parameter count 12*L*h^2 + V*h (approximate; "
                     "mixture-of-experts layers are not modelled)")
    est = MemoryEstimate(stage, method, dtype, zero, gpus, batch, seq, grad_accum, topology, parts, weights, grads,
                         optim, act, overhead, peak + overhead, notes, fsdp2=fsdp2, checkpointing=checkpointing,
                         estimator=estimator, gathered=gathered)
    if stage == "ppo":
        _add_rollout(est, shape, store, dtype, seq, resp, samples_per_prompt,
                     prompts if prompts is not None else max(1, batch // samples_per_prompt),
                     rollout_forward_batch or batch)
    if stage == "ppo" and topology != "separate":
        est.separate_total = estimate(shape, "ppo", "full", dtype, zero, gpus, batch, seq, attn=attn,
                                      topology="separate", reward_model=reward_model, grad_accum=grad_accum,
                                      response_len=response_len, estimator=estimator,
                                      samples_per_prompt=samples_per_prompt, prompts=prompts,
                                      rollout_forward_batch=rollout_forward_batch, fsdp2=fsdp2 and not lora,
                                      checkpointing=checkpointing).total
    return est


def _add_rollout(est: MemoryEstimate, shape: ModelShape, store: str, dtype: str, seq: int, resp: int, k: int,
                 prompts: int, forward_batch: int) -> None:
    """PPO's rollout phase: generation, then the no-grad recompute forwards (policy, critic, reference).
    ZeRO-3 and FSDP2 gather every trained parameter for generation (rlhf.distributed.gathered), so the
    trained models are whole on each device then; the optimiser states stay, the gradients are freed."""
    weights = 0.0
    for p in est.parts:
        bytes_pp = p.bytes_per_param or (4 if est.method != "full" and p.trainable else DTYPE_BYTES[store])
        w = (p.params - p.bits4) * bytes_pp + p.bits4 * NF4_BYTES
        # all but a ZeRO-3 reference: generation gathers the whole trained wrapper (a lora base included)
        whole = not (est.zero >= 3 and p.name.startswith("reference"))
        weights += w if whole else w / est.gpus
    e = DTYPE_BYTES[dtype]
    kv = prompts * k * seq * shape.num_layers * 2 * shape.num_kv_heads * shape.head_dim * e
    rows = forward_batch * (resp + 1) * shape.vocab_size
    logits = rows * e + 4 * min(LOGPROB_CHUNK_BYTES, 4 * rows)  # a chunk is at most the whole batch
    peak = weights + est.optimizer + max(kv, logits)
    est.rollout_weights = weights
    est.rollout_total = peak * (1 + OVERHEAD_FRACTION)
    est.update_total = est.total
    est.total = max(est.update_total, est.rollout_total)
    if est.rollout_total > est.update_total:
        est.notes.append("ppo: the rollout phase is the peak (generation holds the trained models whole)")


def fit_verdict(shape: ModelShape, device_bytes: float, **kwargs) -> tuple[str, MemoryEstimate | None]:
    """One line: whether ``estimate(shape, **kwargs)`` fits ``device_bytes``, else the cheapest change that
    does, tried in order: a smaller micro-batch (accumulation keeps the batch), activation checkpointing,
    LoRA, a higher ZeRO stage. Returns the line and the estimate of the change (None if it fits or none does)."""
    current = estimate(shape, **kwargs)
    cap = device_bytes / GIB
    if current.total <= device_bytes:
        return f"fits: {current.total / GIB:.2f} GiB of {cap:.2f} GiB per device", None
    head = f"does not fit: {current.total / GIB:.2f} GiB > {cap:.2f} GiB per device"
    for change, new in _changes(kwargs):
        try:
            est = estimate(shape, **new)
        except ValueError:
            continue
        if est.total <= device_bytes:
            return f"{head}; cheapest change that fits: {change} -> {est.total / GIB:.2f} GiB", est
    return f"{head}; no single change (smaller micro-batch, checkpointing, LoRA, ZeRO stage) fits: more devices, " \
           "CPU offload or a smaller model", None


def _changes(kw: dict):
    """(description, kwargs) of each candidate change, cheapest first."""
    batch, accum = kw.get("batch", 1), kw.get("grad_accum", 1)
    b = batch // 2
    while b >= 1:
        if batch % b == 0:
            yield f"micro-batch {b} with gradient accumulation {accum * batch // b}", \
                {**kw, "batch": b, "grad_accum": accum * batch // b}
        b //= 2
    if not kw.get("checkpointing"):
        yield "activation checkpointing (activation_checkpointing: true)", {**kw, "checkpointing": True}
    if kw.get("method", "full") == "full":
        lora = {**kw, "method": "lora", "fsdp2": False}
        if kw.get("stage") == "ppo":
            lora["topology"] = "lora"
        yield "LoRA (topology: lora)" if kw.get("stage") == "ppo" else "LoRA (--method lora)", lora
    if kw.get("gpus", 1) > 1 and not kw.get("fsdp2"):
        for z in range(kw.get("zero", 0) + 1, 4):
            yield f"DeepSpeed ZeRO-{z} (configs/accelerate/zero{z}.yaml)" if z in (2, 3) else "DeepSpeed ZeRO-1", \
                {**kw, "zero": z}

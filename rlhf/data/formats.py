"""Converters from each supported record format to the internal schema (see ``schema.py``).

Every converter takes a raw record and returns ``{"messages": [...]}`` (SFT formats) or
``{"prompt": [...], "chosen": [...], "rejected": [...]}`` (preference formats). It raises
``FieldError`` for a record that is not what its format promises (the loader turns it into a
``file:record: field`` message) and ``SkipRecord`` for a content defect whose documented policy is
to skip; repairs are counted in the ``LoadReport`` passed in. The policies are listed in
``POLICIES`` and documented in the README.
"""

from __future__ import annotations

import re

from .schema import LoadReport, SkipRecord


class FieldError(ValueError):
    def __init__(self, field_name: str, message: str):
        super().__init__(message)
        self.field_name = field_name


# Documented defect policies: reason -> what happens. Errors (missing/mistyped fields, bad JSON,
# non-UTF-8, empty file) are not listed: they always stop the load with file:record: field.
POLICIES = {
    "skipped/empty_response": "the (final) assistant response is empty or '<nooutput>': nothing to learn from",
    "skipped/empty_prompt": "no user text at all (Alpaca instruction and input both empty)",
    "skipped/no_assistant_turn": "a conversation without any assistant message has no training signal",
    "skipped/unsupported_role": "tool/function messages are not supported yet",
    "skipped/identical_pair": "chosen == rejected carries no preference",
    "skipped/prompt_mismatch": "HH-RLHF pair whose chosen and rejected transcripts differ before the last reply",
    "skipped/no_final_response": "transcript ends on a Human turn: there is no final reply to compare",
    "skipped/prompt_not_ending_on_user": "the prompt's last turn is not a user turn, so the reply has nothing to answer",
    "skipped/duplicate": "exact duplicate of an earlier record (after conversion)",
    "repaired/placeholder_input": "Alpaca input such as 'No input', '<noinput>', 'N/A' treated as empty",
    "repaired/merged_same_role_turns": "two turns of the same role in a row are joined with a blank line",
    "repaired/trailing_turns_dropped": "non-assistant turns after the last assistant reply are dropped (SFT)",
    "repaired/prompt_prefix_stripped": "chosen/rejected repeated the prompt; the repeated prefix is removed",
    "noted/empty_chosen": "kept: an empty reply can be the preferred one",
    "noted/empty_rejected": "kept: an empty reply is a legitimate bad response",
    "noted/long_text": "kept: a message over 2,000 characters (truncation happens at tokenization)",
}

ROLE_ALIASES = {
    "system": "system",
    "user": "user", "human": "user", "prompter": "user",
    "assistant": "assistant", "gpt": "assistant", "chatgpt": "assistant", "bard": "assistant",
    "bing": "assistant", "model": "assistant", "bot": "assistant",
}
UNSUPPORTED_ROLES = {"tool", "function", "observation", "function_call", "ipython"}
PLACEHOLDER_INPUTS = {"", "no input", "<noinput>", "noinput", "n/a", "na", "none", "null", "nan", "-", "no input.",
                      "<no input>", "无", "无输入"}
EMPTY_OUTPUTS = {"", "<nooutput>", "<no output>", "nooutput"}
LONG_TEXT = 2000


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
            elif isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                raise FieldError(field_name, f"only text content parts are supported, got {str(part)[:60]!r}")
        return "".join(texts)
    raise FieldError(field_name, f"content must be a string or a list of text parts, got {type(content).__name__}")


def _message(raw, field_name: str, role_key: str, content_key: str) -> dict:
    if not isinstance(raw, dict):
        raise FieldError(field_name, f"expected a message object, got {type(raw).__name__}")
    role = raw.get(role_key, raw.get("role", raw.get("from")))
    if not isinstance(role, str):
        raise FieldError(f"{field_name}.{role_key}", "missing or not a string")
    key = role.strip().lower()
    if key in UNSUPPORTED_ROLES:
        raise SkipRecord("unsupported_role")
    if key not in ROLE_ALIASES:
        raise FieldError(f"{field_name}.{role_key}", f"unknown role {role!r} (expected one of {sorted(ROLE_ALIASES)})")
    content_field = content_key if content_key in raw else ("content" if "content" in raw else "value")
    if content_field not in raw:
        raise FieldError(f"{field_name}.{content_key}", "missing")
    return {"role": ROLE_ALIASES[key], "content": _content_text(raw[content_field], f"{field_name}.{content_field}")}


def _messages(raw, field_name: str, role_key="role", content_key="content") -> list[dict]:
    if isinstance(raw, dict):
        raw = [raw]  # a single message object (LLaMA-Factory writes chosen/rejected this way)
    if not isinstance(raw, list):
        raise FieldError(field_name, f"expected a list of messages, got {type(raw).__name__}")
    return [_message(m, f"{field_name}[{i}]", role_key, content_key) for i, m in enumerate(raw)]


def merge_same_role(messages: list[dict], report: LoadReport) -> list[dict]:
    out: list[dict] = []
    for m in messages:
        if out and out[-1]["role"] == m["role"]:
            out[-1] = {"role": m["role"], "content": out[-1]["content"] + "\n\n" + m["content"]}
            report.repaired["merged_same_role_turns"] += 1
        else:
            out.append(dict(m))
    return out


def _note_long(messages: list[dict], report: LoadReport) -> None:
    if any(len(m["content"]) > LONG_TEXT for m in messages):
        report.noted["long_text"] += 1


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
    _note_long(messages, report)
    return {"messages": messages}


def _alpaca_prompt(record: dict, report: LoadReport) -> list[dict]:
    instruction = _get(record, "instruction", str)
    raw_input = _get(record, "input", str, required=False) or ""
    if raw_input.strip().lower() in PLACEHOLDER_INPUTS:
        if raw_input.strip():
            report.repaired["placeholder_input"] += 1
        raw_input = ""
    user = "\n\n".join(t for t in (instruction.strip(), raw_input.strip()) if t)
    if not user:
        raise SkipRecord("empty_prompt")
    messages = []
    system = _get(record, "system", str, required=False)
    if system:
        messages.append({"role": "system", "content": system})
    for i, turn in enumerate(_get(record, "history", list, required=False) or []):
        if not (isinstance(turn, list | tuple) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise FieldError(f"history[{i}]", "expected a [question, answer] pair of strings")
        messages += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
    messages.append({"role": "user", "content": user})
    return messages


def convert_alpaca(record: dict, report: LoadReport) -> dict:
    messages = _alpaca_prompt(record, report)
    output = _get(record, "output", str)
    if output.strip().lower() in EMPTY_OUTPUTS:
        raise SkipRecord("empty_response")
    return finish_conversation(messages + [{"role": "assistant", "content": output}], report)


def convert_messages(record: dict, report: LoadReport) -> dict:
    return finish_conversation(_messages(_get(record, "messages", list), "messages"), report)


def convert_sharegpt(record: dict, report: LoadReport) -> dict:
    key = "conversations" if "conversations" in record else "conversation"
    messages = _messages(_get(record, key, list), key, role_key="from", content_key="value")
    system = record.get("system")
    if isinstance(system, str) and system and not (messages and messages[0]["role"] == "system"):
        messages.insert(0, {"role": "system", "content": system})
    return finish_conversation(messages, report)


def _prompt_messages(record: dict) -> list[dict]:
    raw = _get(record, "prompt", (str, list))
    return [{"role": "user", "content": raw}] if isinstance(raw, str) else _messages(raw, "prompt")


def convert_prompt_completion(record: dict, report: LoadReport) -> dict:
    """TRL's prompt-completion shape: ``prompt`` and ``completion`` as strings or messages."""
    prompt = _prompt_messages(record)
    completion = _response(_get(record, "completion", (str, list, dict)), "completion", prompt, report)
    return finish_conversation(prompt + completion, report)


def convert_prompt_only(record: dict, report: LoadReport) -> dict:
    """Prompts for generation (PPO, evaluation): ``prompt`` as a string or messages ending on a user turn."""
    prompt = merge_same_role(_prompt_messages(record), report)
    if prompt[-1]["role"] != "user":
        raise SkipRecord("prompt_not_ending_on_user")
    return {"prompt": prompt}


# ---------------------------------------------------------------------------------------------
# preference formats


def _response(raw, field_name: str, prompt: list[dict], report: LoadReport) -> list[dict]:
    if isinstance(raw, str):
        return [{"role": "assistant", "content": raw}]
    messages = _messages(raw, field_name)
    if prompt and len(messages) > len(prompt) and messages[: len(prompt)] == prompt:
        messages = messages[len(prompt):]
        report.repaired["prompt_prefix_stripped"] += 1
    if not messages or any(m["role"] != "assistant" for m in messages):
        raise FieldError(field_name, "expected the assistant response (a string or assistant messages)")
    return messages


def finish_pair(prompt: list[dict], chosen: list[dict], rejected: list[dict], report: LoadReport) -> dict:
    prompt = merge_same_role(prompt, report)
    if not prompt or prompt[-1]["role"] != "user":
        raise SkipRecord("prompt_not_ending_on_user")
    if chosen == rejected:
        raise SkipRecord("identical_pair")
    if not "".join(m["content"] for m in chosen).strip():
        report.noted["empty_chosen"] += 1
    if not "".join(m["content"] for m in rejected).strip():
        report.noted["empty_rejected"] += 1
    _note_long(prompt + chosen + rejected, report)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def convert_explicit_preference(record: dict, report: LoadReport) -> dict:
    prompt = _prompt_messages(record)
    chosen = _response(_get(record, "chosen", (str, list, dict)), "chosen", prompt, report)
    rejected = _response(_get(record, "rejected", (str, list, dict)), "rejected", prompt, report)
    return finish_pair(prompt, chosen, rejected, report)


def convert_implicit_preference(record: dict, report: LoadReport) -> dict:
    chosen = _messages(_get(record, "chosen", list), "chosen")
    rejected = _messages(_get(record, "rejected", list), "rejected")
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    # the prompt ends on the last user turn of the shared prefix; everything after is the response
    while shared and chosen[shared - 1]["role"] != "user":
        shared -= 1
    if shared == 0:
        raise SkipRecord("prompt_mismatch")
    return finish_pair(chosen[:shared], chosen[shared:], rejected[shared:], report)


def convert_alpaca_preference(record: dict, report: LoadReport) -> dict:
    prompt = _alpaca_prompt(record, report)
    chosen = _response(_get(record, "chosen", (str, list, dict)), "chosen", prompt, report)
    rejected = _response(_get(record, "rejected", (str, list, dict)), "rejected", prompt, report)
    return finish_pair(prompt, chosen, rejected, report)


def convert_sharegpt_preference(record: dict, report: LoadReport) -> dict:
    """``dpo_zh_500`` style: the prompt in ``conversations`` (from/value), replies as strings or messages."""
    prompt = _messages(_get(record, "conversations", list), "conversations", role_key="from", content_key="value")

    def reply(name):
        raw = _get(record, name, (str, list, dict))
        if isinstance(raw, str):
            return [{"role": "assistant", "content": raw}]
        msgs = _messages(raw, name, role_key="from", content_key="value")
        if any(m["role"] != "assistant" for m in msgs):
            raise FieldError(name, "expected the assistant response")
        return msgs

    return finish_pair(prompt, reply("chosen"), reply("rejected"), report)


HH_MARKER = re.compile(r"(?:^|\n\n)(Human|Assistant):[ ]?")


def parse_hh_transcript(text: str, field_name: str) -> list[dict]:
    """``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` -> messages (same-role runs are merged by the caller)."""
    parts = HH_MARKER.split(text)
    if len(parts) < 3:
        raise FieldError(field_name, "not an HH-RLHF transcript (no '\\n\\nHuman:' / '\\n\\nAssistant:' markers)")
    if parts[0].strip():
        raise FieldError(field_name, f"text before the first role marker: {parts[0][:40]!r}")
    return [
        {"role": "user" if role == "Human" else "assistant", "content": content}
        for role, content in zip(parts[1::2], parts[2::2])
    ]


def convert_hh(record: dict, report: LoadReport) -> dict:
    halves = {}
    for name in ("chosen", "rejected"):
        turns = merge_same_role(parse_hh_transcript(_get(record, name, str), name), report)
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
    """The format a record looks like, from its keys (and, for chosen/rejected, their types)."""
    keys = set(record)
    if {"chosen", "rejected"} <= keys:
        if "prompt" in keys:
            return "preference"
        if "conversations" in keys:
            return "sharegpt_preference"
        if "instruction" in keys:
            return "alpaca_preference"
        chosen = record["chosen"]
        if isinstance(chosen, str):
            return "hh"
        if isinstance(chosen, list):
            return "implicit_preference"
        return None
    if "prompt" in keys:
        return "prompt_completion" if "completion" in keys else "prompt"
    if "messages" in keys:
        return "messages"
    if "conversations" in keys or "conversation" in keys:
        return "sharegpt"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    return None

"""Item -> token ids, with literal user text and bounded work (``render_item``; rules in ``reward_models.scoring``).

Literal text: the chat template's own special tokens (turn markers, EOS) are the only special tokens in
a rendered conversation. A message's content is encoded as plain text, so a string like ``<|im_end|>``
in it stays those characters and cannot close a turn or open a forged one. Ordinary content (no
special-token string in it) is rendered by the tokenizer itself, ``tokenizer(apply_chat_template(...))``;
a conversation whose contents hold such strings is split here at the template's special tokens, and
each run of text between two of them encoded as a whole with those strings as plain text -- what the
tokenizer does, less the forgery. Raw ``text`` items are the caller's own formatting: their
special-token strings are parsed.

Bounded work: a long input is cut from the left *before* it is tokenized, to a window of characters
derived from the token limit, grown only when that many characters do not give enough tokens. The few
tokens at the cut are dropped (a word cut in half tokenizes differently), so the kept tail is what
tokenizing the whole text would give, and a 4 MB string costs what a few thousand characters cost.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

CHARS_PER_TOKEN = 8  # first window: generous for BPE vocabularies (about 4 characters per token in English)
CUT_SLACK = 16  # tokens dropped at a cut: the first ones may belong to a word that the cut split


class TooLong(ValueError):
    def __init__(self, n_tokens: int, max_length: int, exact: bool = True):
        count = f"{n_tokens} tokens" if exact else f"more than {n_tokens} tokens"
        super().__init__(f"input is {count}, over the model's limit of {max_length}; shorten it or send "
                         '"truncate": true (the input is then cut from the left, so the end of the response survives)')
        self.n_tokens, self.max_length = n_tokens, max_length


@dataclass
class Rendered:
    input_ids: list[int]  # what the model reads
    truncated: bool  # the input was over max_length and cut from the left

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)


class _Vocab:
    """What rendering needs from a tokenizer, built once per tokenizer: its special-token strings, copies
    of its backend that parse them or encode them as plain text, and the ids it adds around raw text."""

    def __init__(self, tokenizer):
        added = [t for t in tokenizer.added_tokens_decoder.values() if t.special]
        self.specials = {t.content: tokenizer.convert_tokens_to_ids(t.content) for t in added}
        # longest first: the tokenizer takes the longest match; lstrip/rstrip tokens take the spaces beside them
        alternatives = [(r"\s*" if t.lstrip else "") + re.escape(t.content) + (r"\s*" if t.rstrip else "")
                        for t in sorted(added, key=lambda t: len(t.content), reverse=True)]
        self.pattern = re.compile("|".join(alternatives)) if alternatives else None
        self.size = len(tokenizer)
        self.tokenizer, self.backends = tokenizer, None
        if getattr(tokenizer, "backend_tokenizer", None) is not None:
            # private copies, one parsing special-token strings and one not: the flag is global to a
            # backend, and rendering runs in threads
            self.backends = {parse: self._copy(tokenizer.backend_tokenizer, parse) for parse in (True, False)}
        with_specials, without = tokenizer("a")["input_ids"], tokenizer("a", add_special_tokens=False)["input_ids"]
        start = next((i for i in range(len(with_specials)) if with_specials[i:i + len(without)] == without), 0)
        self.prefix, self.suffix = with_specials[:start], with_specials[start + len(without):]

    @staticmethod
    def _copy(backend, parse: bool):
        from tokenizers import Tokenizer

        copy = Tokenizer.from_str(backend.to_str())
        copy.encode_special_tokens = not parse
        copy.no_truncation()
        copy.no_padding()
        return copy

    def encode(self, texts: list[str], parse: bool) -> list[list[int]]:
        """Token ids of each text; ``parse``: special-token strings in it are special tokens, else plain text."""
        if self.backends is not None:
            return [e.ids for e in self.backends[parse].encode_batch(texts, add_special_tokens=False)]
        return self.tokenizer(texts, add_special_tokens=False, split_special_tokens=not parse)["input_ids"]

    def has_special(self, text: str) -> bool:
        return self.pattern is not None and self.pattern.search(text) is not None


def vocab(tokenizer) -> _Vocab:
    cached = getattr(tokenizer, "_rlhf_vocab", None)
    if cached is None or cached.size != len(tokenizer):  # built anew when tokens were added since
        cached = _Vocab(tokenizer)
        tokenizer._rlhf_vocab = cached
    return cached


# A piece of an item's text: (text, parse) where parse says whether its special-token strings are real
# special tokens (template text, raw text items) or plain text (message contents); or fixed ids.
Piece = tuple[str, bool] | list[int]


def _conversation_pieces(tokenizer, v: _Vocab, messages: list[dict]) -> list[Piece]:
    """The rendered conversation; where a content holds a special-token string, that content as a literal
    piece. The template is then rendered again with placeholders, to know where each content goes, and the
    result checked against the real rendering (a template that rewrites contents cannot be split safely)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    if not any(v.has_special(m["content"]) for m in messages):
        return [(text, True)]  # every special token in it is the template's: the tokenizer's own parse
    marks = [f"\ue000{i}\ue001" for i in range(len(messages))]
    skeleton = tokenizer.apply_chat_template([{**m, "content": k} for m, k in zip(messages, marks)], tokenize=False)
    parts = re.split("\ue000(\\d+)\ue001", skeleton)
    for contents in ([m["content"] for m in messages], [m["content"].strip() for m in messages]):  # some templates trim
        filled = [part if k % 2 == 0 else contents[int(part)] for k, part in enumerate(parts)]
        if "".join(filled) == text:
            return [(part, k % 2 == 0) for k, part in enumerate(filled) if part]
    raise ValueError("the chat template rewrites message contents, and a content holds a special-token string: "
                     "it cannot be rendered without that string becoming a real special token")


def _tail(pieces: list[Piece], window: float) -> tuple[list[Piece], bool]:
    """The pieces' last ``window`` characters (fixed ids count as one character each), and whether any was cut."""
    kept, room = [], window
    for piece in reversed(pieces):
        size = len(piece[0]) if isinstance(piece, tuple) else len(piece)
        if size > room:
            if isinstance(piece, tuple) and room > 0:
                kept.append((piece[0][len(piece[0]) - int(room):], piece[1]))
            return kept[::-1], True
        kept.append(piece)
        room -= size
    return kept[::-1], False


def _encode(v: _Vocab, pieces: list[Piece], memo: dict) -> list[int]:
    """Token ids of the pieces. Without a literal piece, the tokenizer's own parse of each text. With one,
    the parsed pieces are split at special-token strings here, what lies between two special tokens is
    joined into one run (as the tokenizer does) and each run encoded as plain text."""
    if all(isinstance(p, list) or p[1] for p in pieces):
        texts = [p[0] for p in pieces if isinstance(p, tuple) and p[0] not in memo]
        for text, ids in zip(texts, v.encode(texts, parse=True) if texts else ()):
            memo[text] = ids
        return [t for p in pieces for t in (p if isinstance(p, list) else memo[p[0]])]
    segments: list[str | int] = []  # a run of text, or one special-token id
    run: list[str] = []
    for piece in pieces:
        if isinstance(piece, list):
            segments += ["".join(run), *piece]
            run = []
            continue
        text, parse = piece
        start = 0
        for match in (v.pattern.finditer(text) if parse and v.pattern is not None else ()):
            run.append(text[start:match.start()])
            token = match.group() if match.group() in v.specials else match.group().strip()  # lstrip/rstrip
            segments += ["".join(run), v.specials[token]]
            run, start = [], match.end()
        run.append(text[start:])
    segments.append("".join(run))
    runs = [s for s in segments if isinstance(s, str) and s and ("literal", s) not in memo]
    for s, ids in zip(runs, v.encode(runs, parse=False) if runs else ()):
        memo[("literal", s)] = ids
    return [t for s in segments for t in ([s] if isinstance(s, int) else memo.get(("literal", s), ()))]


def _end_at_the_turn(tokenizer, pieces: list[Piece]) -> list[Piece]:
    """Drop what a template writes after the last turn's end-of-turn token (ChatML's trailing newline), so the
    reward is read at that token -- where PPO puts the score on the policy's stop token (docs/design.md,
    detail 6), and the same token in RM training, PPO and the API."""
    from rlhf.models import end_of_turn_token

    end = end_of_turn_token(tokenizer)
    last = pieces[-1] if pieces else None
    if isinstance(last, tuple) and last[1] and end and last[0].rstrip().endswith(end) and last[0] != last[0].rstrip():
        return [*pieces[:-1], (last[0].rstrip(), True)]
    return pieces


def item_pieces(tokenizer, item: dict) -> list[Piece]:
    from .scoring import as_messages

    v = vocab(tokenizer)
    messages = as_messages(item)
    # the template writes any BOS itself (as apply_chat_template(tokenize=True) does); raw text gets the
    # tokenizer's own, if it adds one. Protocol adapters may say otherwise, as the servers they stand in for do
    around = item.get("add_special_tokens", messages is None)
    if messages is not None:
        pieces = _end_at_the_turn(tokenizer, _conversation_pieces(tokenizer, v, messages))
    else:
        text = item["text"]
        if item.get("append_eos", True) and tokenizer.eos_token and not text.endswith(tokenizer.eos_token):
            text += tokenizer.eos_token
        pieces = [(text, True)]
    return [p for p in (v.prefix if around else [], *pieces, v.suffix if around else []) if p]


def render_pieces(tokenizer, pieces: list[Piece], max_length: int | None, truncate: bool,
                  memo: dict | None = None) -> Rendered:
    v, memo = vocab(tokenizer), {} if memo is None else memo
    window = float("inf") if max_length is None else CHARS_PER_TOKEN * (max_length + CUT_SLACK)
    while True:
        kept, cut = _tail(pieces, window)
        ids = _encode(v, kept, memo)
        if not cut:
            break
        if len(ids) > max_length + CUT_SLACK:  # enough tokens without the ones the cut may have changed
            ids = ids[CUT_SLACK:]
            break
        window *= 4  # text with few characters per token (e.g. CJK, emoji bytes): look further back
    if max_length is None or (len(ids) <= max_length and not cut):
        return Rendered(ids, False)
    if not truncate:
        raise TooLong(len(ids), max_length, exact=not cut)
    return Rendered(ids[len(ids) - max_length:], True)

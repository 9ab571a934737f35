"""The message layer: every record layout becomes a conversation, a list of {role, content} turns (system?, user,
assistant, user, assistant, ...), before any template turns it into ids (data.formats).

    Alpaca                    instruction (+ "\\n\\n" + input) -> user; output -> assistant
    LLaMA-Factory's Alpaca    the same, after `system` (a system turn) and `history` ([[user, assistant], ...])
    ShareGPT                  conversations: [{from: human|gpt|system, value}] (also {role, content})
    OpenAI                    messages: [{role: system|user|assistant, content}]

An Alpaca record keeps its instruction and input apart as well (`alpaca`), since the paper's template places them in
two sections. `check_turns` holds a conversation to the order a chat template can train on; what it finds is a
TurnProblem naming the turn, which the loaders make a RecordError (file, record, turn) or, with
data.skip_invalid=true, a counted skip. The shape follows torchtune's message transforms (AlpacaToMessages,
ShareGPTToMessages); the code is ours.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
ALPACA_FIELDS = ("instruction", "input", "output")
CONVERSATION_KEYS = ("conversations", "messages")


class RecordProblem(Exception):
    """A record whose structure cannot be read (not an object, a field of the wrong type): the message says which."""


class TurnProblem(Exception):
    """A conversation a template cannot train on: the message names the turn."""


@dataclass
class Conversation:
    messages: list[dict[str, str]]
    layout: str  # alpaca | llama_factory | sharegpt | messages
    unused: set[str] = field(default_factory=set)  # the record's fields that are not part of the conversation
    alpaca: tuple[str, str] | None = None  # an Alpaca record's (instruction, input), as the paper's template needs them
    untrained: tuple[int, ...] = ()  # assistant turns marked `weight: 0`: kept as context, not trained on


def alpaca_user_text(instruction: str, input: str) -> str:
    """The user turn of an Alpaca record: the instruction, then its input after a blank line."""
    return f"{instruction}\n\n{input}" if input else instruction


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise RecordProblem(f"field '{where}' is {type(value).__name__}, not a string")
    return value


def _weight(turn: dict, where: str) -> int:
    """A turn's `weight` (ShareGPT's, as axolotl and LLaMA-Factory's multi-turn data carry it): 1 (the default) trains
    on an assistant turn, 0 keeps it as context only."""
    weight = turn.get("weight", 1)
    if isinstance(weight, str) or weight not in (0, 1):
        raise RecordProblem(f"field '{where}' is {weight!r}: 0 (kept as context, not trained on) or 1 (trained on)")
    return int(weight)


def read_conversation(record: Any) -> Conversation:
    """The conversation of one record of any layout above; a RecordProblem when its structure cannot be read.
    Turn order and emptiness are not judged here (check_turns), so that each template can say what it accepts."""
    if not isinstance(record, dict):
        raise RecordProblem(f"is a JSON {type(record).__name__}, not an object")
    key = next((k for k in CONVERSATION_KEYS if k in record), None)
    if key is not None:
        turns = record[key]
        if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
            raise RecordProblem(f"field '{key}' is not a list of turn objects")
        messages, untrained = [], []
        for i, turn in enumerate(turns):
            who, say = ("from", "value") if "from" in turn else ("role", "content")
            role = ROLES.get(str(turn.get(who)), str(turn.get(who)))
            messages.append({"role": role, "content": _text(turn.get(say), f"{key}[{i}].{say}")})
            if _weight(turn, f"{key}[{i}].weight") == 0 and role == "assistant":
                untrained.append(i)
        layout = "sharegpt" if key == "conversations" else "messages"
        return Conversation(messages, layout, set(record) - {key}, untrained=tuple(untrained))
    for name in ("instruction", "output"):
        if name not in record:
            raise RecordProblem(f"field '{name}' is missing")
    instruction, output = _text(record["instruction"], "instruction"), _text(record["output"], "output")
    input_ = record.get("input")
    input_ = "" if input_ is None else _text(input_, "input")  # absent, or null in a table format: no input
    messages = []
    system, history = record.get("system"), record.get("history")
    if system:
        messages.append({"role": "system", "content": _text(system, "system")})
    if history:
        if not isinstance(history, list) or not all(isinstance(h, (list, tuple)) and len(h) == 2 for h in history):
            raise RecordProblem("field 'history' is not a list of [user, assistant] pairs")
        for i, (user, assistant) in enumerate(history):
            messages += [
                {"role": "user", "content": _text(user, f"history[{i}][0]")},
                {"role": "assistant", "content": _text(assistant, f"history[{i}][1]")},
            ]
    messages += [
        {"role": "user", "content": alpaca_user_text(instruction, input_)},
        {"role": "assistant", "content": output},
    ]
    layout = "llama_factory" if system or history else "alpaca"
    return Conversation(
        messages, layout, set(record) - set(ALPACA_FIELDS) - {"system", "history"}, (instruction, input_)
    )


def check_turns(messages: list[dict[str, str]], final: str = "assistant") -> None:
    """A TurnProblem unless the turns are: an optional system turn first, then user and assistant in turn, starting
    with user and ending with `final` (assistant for training; user for a prompt to answer), none of them empty."""
    if not messages:
        raise TurnProblem("has no turns")
    for i, message in enumerate(messages):
        role = message["role"]
        if role not in ("system", "user", "assistant"):
            raise TurnProblem(f"turn {i}: unknown role '{role}' (expected system, user or assistant)")
        if not message["content"].strip():
            raise TurnProblem(f"turn {i}: the {role} turn is empty")
        if role == "system" and i != 0:
            raise TurnProblem(f"turn {i}: a system turn can only come first")
    body = messages[1:] if messages[0]["role"] == "system" else messages
    offset = len(messages) - len(body)
    for j, message in enumerate(body):
        expected = "user" if j % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise TurnProblem(f"turn {j + offset}: a {message['role']} turn where a {expected} turn belongs")
    if not body or body[-1]["role"] != final:
        raise TurnProblem(f"turn {len(messages) - 1}: the conversation ends without an {final} turn")

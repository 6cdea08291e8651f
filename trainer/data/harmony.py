"""OpenAI-format rows -> harmony conversations -> token ids + label masks, via openai-harmony's renderer.

The token format is never written by hand here: every token comes from openai-harmony, and the label
mask is derived from the renderer's own output. Each message's span is located by rendering that
message alone (checked to tile the whole conversation exactly), and the prompt of each assistant run
is what ``render_conversation_for_completion`` gives the model at inference (checked to be a prefix).

Why not ``render_conversation_for_training`` with its defaults: openai-harmony 0.0.8's
``auto_drop_analysis`` drops the analysis before the *first* final message of the conversation. For
a single-response sample that discards its reasoning; for three responses it keeps the middle one's.
We always render with ``auto_drop_analysis=False`` and decide which analysis to keep ourselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gptoss_cloud.contract.datafields import role_names

from gptoss_cloud.trainer.data.notes import Notes, clip, short
from gptoss_cloud.trainer.data.rows import ChatMessage, Row, RowError, parse_row
from gptoss_cloud.trainer.data.vocab import load_encoding

if TYPE_CHECKING:
    from gptoss_cloud.contract.sections import DataSection, DatasetSource

IGNORE = -100


@dataclass
class TokenizedSequence:
    """One training sequence before packing. labels[i] == input_ids[i] where trained, else -100."""

    row: int
    input_ids: list[int]
    labels: list[int]

    @property
    def trained(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


@dataclass
class _Item:
    """One harmony message plus what masking needs to know about it."""

    msg: Any  # openai_harmony.Message
    kind: str  # system | developer | user | analysis | commentary | call | final | tool
    response: int | None = None  # index of the response it belongs to (assistant and tool items)
    train: bool = True  # False: the source message said train: false

    @property
    def assistant(self) -> bool:
        return self.kind in ("analysis", "commentary", "call", "final")


# ------------------------------------------------------------------------------------ conversion
def _system_message(data: "DataSection", effort: str):
    from openai_harmony import Message, ReasoningEffort, Role, SystemContent

    sc = SystemContent.new().with_reasoning_effort(ReasoningEffort[effort.upper()])
    sc.knowledge_cutoff = data.knowledge_cutoff
    sc.conversation_start_date = data.conversation_date  # rendered only when set: never today's date
    if data.model_identity:
        sc.model_identity = data.model_identity
    return Message.from_role_and_content(Role.SYSTEM, sc)


def _developer_message(instructions: list[str], tools):
    from openai_harmony import DeveloperContent, Message, Role, ToolDescription

    dc = DeveloperContent.new()
    text = "\n\n".join(t for t in instructions if t)
    if text:
        dc = dc.with_instructions(text)
    if tools:
        dc = dc.with_function_tools([ToolDescription.new(t.name, t.description, t.parameters) for t in tools])
    return Message.from_role_and_content(Role.DEVELOPER, dc)


def _result_of(call, free: list[ChatMessage]) -> ChatMessage | None:
    """By tool_call_id when the call has one, else by function name, else (neither side named) by position."""
    hit = None
    if call.id:
        hit = next((t for t in free if t.tool_call_id == call.id), None)
    if hit is None:
        hit = next((t for t in free if t.tool_call_id is None and t.name == call.name), None)
    if hit is None:
        hit = next((t for t in free if t.tool_call_id is None and t.name is None), None)
    if hit is not None:
        free.remove(hit)
    return hit


def _match_results(msg: ChatMessage, pending: list[ChatMessage], more_follow: bool, err, note) -> list[tuple]:
    """(call, its result or None) for the calls of ``msg`` that are rendered, paired with the tool
    messages that follow it.

    A conversation may end with calls that have no results (single-step function-calling data: the
    calls are the target). Harmony emits one call and stops at ``<|call|>``, so the first call without
    a result ends the sequence: it is trained, and the calls after it are dropped and counted.
    """
    ids = [c.id for c in msg.tool_calls if c.id]
    if len(set(ids)) < len(ids):
        note("duplicate_call_ids")
    free = list(pending)
    out: list[tuple] = []
    for k, call in enumerate(msg.tool_calls):
        hit = _result_of(call, free)
        if hit is None and more_follow:
            err(f"message {msg.index} (assistant): tool call {short(call.name)}"
                f"{f' (id {clip(call.id)})' if call.id else ''} has no result")
        out.append((call, hit))
        if hit is None:
            rest = msg.tool_calls[k + 1 :]
            for c in rest:  # their results, if any, go with them
                _result_of(c, free)
            if rest:
                note("calls_without_results", len(rest))
            break
    if free:
        t = free[0]
        err(f"message {t.index} (tool): result without a matching call "
            f"(tool_call_id={short(t.tool_call_id)}, name={short(t.name)}; "
            f"calls: {clip(', '.join(c.id or c.name for c in msg.tool_calls), 120)})")
    return out


def _assistant_items(m: ChatMessage, msgs: list[ChatMessage], i: int, items: list[_Item], err, note) -> None:
    """Append one OpenAI assistant message (and the tool results after it, msgs[i:]) as harmony messages."""
    from openai_harmony import Author, Message, Role

    def add(content: str, kind: str, channel: str):
        msg = Message.from_role_and_content(Role.ASSISTANT, content).with_channel(channel)
        items.append(_Item(msg, kind, train=m.train))
        return msg

    if m.thinking:
        add(m.thinking, "analysis", "analysis")
    if not m.tool_calls:
        if m.content is not None:
            add(m.content, "final", "final")
        return
    if m.content is not None:  # text beside tool calls: a preamble on the commentary channel
        add(m.content, "commentary", "commentary")
    j = i
    while j < len(msgs) and msgs[j].role == "tool":
        j += 1
    # Harmony runs one call at a time (generation stops at <|call|>): interleave call, result.
    for call, res in _match_results(m, msgs[i:j], more_follow=j < len(msgs), err=err, note=note):
        msg = add(call.arguments, "call", "commentary")
        msg.recipient, msg.content_type = f"functions.{call.name}", "<|constrain|>json"
        if res is not None:
            tr = Message.from_author_and_content(Author.new(Role.TOOL, f"functions.{call.name}"), res.content or "")
            items.append(_Item(tr.with_channel("commentary").with_recipient("assistant"), "tool"))


def to_items(row: Row, data: "DataSection", *, source: str, index: int, notes: Notes | None = None) -> list[_Item]:
    """Convert a parsed row into harmony messages, in render order, with response indices."""
    from openai_harmony import Message, Role

    def err(problem: str):
        raise RowError(source, index, problem)

    def note(kind: str, n: int = 1):
        if notes is not None:
            notes.add(kind, source, index, n)

    msgs = row.messages
    items = [_Item(_system_message(data, row.reasoning_effort or data.reasoning_effort), "system")]
    # Leading system/developer messages become the harmony developer message's instructions, as in
    # the gpt-oss chat template; the row's tools become its `functions` namespace.
    k = 0
    while k < len(msgs) and msgs[k].role in ("system", "developer"):
        k += 1
    if k or row.tools:
        items.append(_Item(_developer_message([m.content or "" for m in msgs[:k]], row.tools), "developer"))

    i = k
    while i < len(msgs):
        m = msgs[i]
        i += 1
        if m.role in ("system", "developer"):
            items.append(_Item(_developer_message([m.content or ""], None), "developer"))
        elif m.role == "user":
            items.append(_Item(Message.from_role_and_content(Role.USER, m.content or ""), "user"))
        elif m.role == "tool":
            err(f"message {m.index} (tool): result without a matching call (no assistant tool_calls before it)")
        else:
            _assistant_items(m, msgs, i, items, err, note)
            while m.tool_calls and i < len(msgs) and msgs[i].role == "tool":  # consumed with their calls
                i += 1

    # Responses: from the first assistant message after a user (or system/developer) message up to
    # and including a final answer.
    r, open_ = -1, False
    for it in items:
        if it.assistant:
            if not open_:
                r, open_ = r + 1, True
            it.response = r
            if it.kind == "final":
                open_ = False
        elif it.kind == "tool":
            it.response = r
        else:
            open_ = False
    return items


# ------------------------------------------------------------------------------------- planning
def plan_sequences(items: list[_Item], train_on: str, thinking_turns: str) -> list[tuple[list[_Item], set[int]]]:
    """Which sequences to render, and which responses each one trains (the table in docs/data.md)."""
    n = 1 + max((it.response for it in items if it.response is not None), default=-1)
    last = n - 1
    has_analysis = {it.response for it in items if it.kind == "analysis"}

    def without_analysis(its, before: int) -> list[_Item]:
        return [it for it in its if not (it.kind == "analysis" and it.response < before)]

    def upto(its, r: int) -> list[_Item]:
        end = max(k for k, it in enumerate(its) if it.response == r)
        return its[: end + 1]

    every = set(range(n)) if train_on == "all" else {last}
    if thinking_turns == "drop":
        plans = [(without_analysis(items, n), every)]
    elif thinking_turns == "last":
        plans = [(without_analysis(items, last), {last})]
    elif any(r < last for r in has_analysis):  # expand: one sequence per response, as at inference
        plans = [(without_analysis(items, r), {r}) for r in sorted(every)]
    else:
        plans = [(items, every)]
    out = []
    for its, trained in plans:
        trained = trained & {it.response for it in its if it.assistant}  # `drop` can empty an analysis-only response
        if trained:
            out.append((upto(its, max(trained)), trained))
    return out


# ------------------------------------------------------------------------------------ rendering
def render_with_labels(items: list[_Item], trained: set[int]) -> tuple[list[int], list[int]]:
    """Render with openai-harmony and mask: see the module docstring for how spans are found."""
    ids, labels, _ = render_with_kinds(items, trained)
    return ids, labels


def render_with_kinds(items: list[_Item], trained: set[int]) -> tuple[list[int], list[int], list[str | None]]:
    """``render_with_labels`` plus, for each position, the kind of the item whose trained span holds it
    (analysis | commentary | call | final; None where not trained): evaluation's per-kind loss."""
    from openai_harmony import Conversation, RenderConversationConfig, RenderOptions, Role

    enc = load_encoding()
    keep = RenderConversationConfig(auto_drop_analysis=False)
    msgs = [it.msg for it in items]
    conv = Conversation.from_messages(msgs)
    # A final answer ending the sequence closes with <|return|>, as the model ends it at inference:
    # that is the one token where the training render differs from the history render.
    ends_final = items[-1].kind == "final"
    ids = (enc.render_conversation_for_training if ends_final else enc.render_conversation)(conv, keep)

    has_functions = any(it.kind == "developer" and it.msg.content[0].tools for it in items)
    opts = RenderOptions(conversation_has_function_tools=has_functions)
    spans, pos = [], 0
    for k, m in enumerate(msgs):
        t = enc.render(m, opts)
        n = len(t) - 1 if ends_final and k == len(msgs) - 1 else len(t)
        if ids[pos : pos + n] != t[:n]:
            raise RuntimeError("internal: a message rendered alone does not match its place in the conversation")
        spans.append((pos, pos + len(t)))
        pos += len(t)
    if pos != len(ids):
        raise RuntimeError("internal: rendered messages do not tile the conversation")

    labels = [IGNORE] * len(ids)
    kinds: list[str | None] = [None] * len(ids)
    for k, it in enumerate(items):
        if not it.assistant or it.response not in trained or not it.train:
            continue
        a, b = spans[k]
        if k == 0 or not items[k - 1].assistant:
            # First message of an assistant run: the prompt the model sees ends at `<|start|>assistant`.
            prompt = enc.render_conversation_for_completion(Conversation.from_messages(msgs[:k]), Role.ASSISTANT, keep)
            if ids[: len(prompt)] != prompt or not a < len(prompt) < b:
                raise RuntimeError("internal: completion prompt is not a prefix of the rendered conversation")
            a = len(prompt)
        if it.kind == "final" and k != len(items) - 1:
            b -= 1  # an earlier final answer closes with <|end|> as history stores it: not trained
        labels[a:b] = ids[a:b]
        kinds[a:b] = [it.kind] * (b - a)
    return ids, labels, kinds


# ----------------------------------------------------------------------------------- entry points
def tokenize_parsed(row: Row, data: "DataSection", *, index: int, source: str = "<row>",
                    notes: Notes | None = None) -> list[TokenizedSequence]:
    items = to_items(row, data, source=source, index=index, notes=notes)
    out = []
    for its, trained in plan_sequences(items, data.train_on, data.thinking_turns):
        ids, labels = render_with_labels(its, trained)
        out.append(TokenizedSequence(row=index, input_ids=ids, labels=labels))
    return out


def tokenize_row(raw: Any, data: "DataSection", *, index: int = 0, source: "DatasetSource | None" = None,
                 source_name: str | None = None, notes: Notes | None = None) -> list[TokenizedSequence]:
    """One OpenAI-format row (a dict) -> its training sequences. Raises RowError for a malformed row.

    What was converted, dropped or defaulted is added to ``notes`` when the row is accepted."""
    fields = {}
    if source is not None:
        fields = dict(field_messages=source.field_messages, field_thinking=source.field_thinking,
                      field_tools=source.field_tools, field_reasoning_effort=source.field_reasoning_effort,
                      properties=source.message_property_mappings, roles=role_names(source.roles))
    name = source_name or (source.path if source is not None else "<row>")
    mine = Notes()
    row = parse_row(raw, source=name, row=index, notes=mine, **fields)
    seqs = tokenize_parsed(row, data, index=index, source=name, notes=mine)
    if data.conversation_date is None:
        mine.add("no_conversation_date", name, index)
    if notes is not None:
        notes.update(mine)
    return seqs

"""Bounded YAML for specs: every spec file, run home ``spec.yaml`` and GPTOSS_* value goes through here.

A spec may come from a bucket anyone with write access can fill, so its YAML is untrusted input.
PyYAML builds aliases as shared nodes, so ``safe_load`` itself is quick on an alias bomb; what blows
up is everything after it that walks the tree as if it were a tree (validation, merging, dumping):
nine levels of ten aliases is a billion nodes. We compose the node graph, count the nodes it stands
for with each shared node counted as often as it is referenced (linear time, memoised), and refuse
before anything walks it. Size and depth are bounded too, and errors quote only a short prefix.
"""

from __future__ import annotations

from typing import Any

import yaml

from gptoss_cloud.contract.errors import SpecError

MAX_BYTES = 1 << 20          # a full spec with comments is ~10 KiB
MAX_NODES = 100_000          # expanded scalars + collections; a spec has a few hundred
MAX_DEPTH = 64               # a spec nests 4 levels
QUOTE_CHARS = 60


def quote(value: Any, limit: int = QUOTE_CHARS) -> str:
    """repr() of a value, cut to a short prefix: error messages never echo a whole (expanded) input."""
    text = repr(value) if not isinstance(value, str) else repr(value[: limit + 1])
    return text if len(text) <= limit else text[:limit] + "...(cut)"


def _expanded_size(root: yaml.Node, where: str) -> int:
    sizes: dict[int, int] = {}
    # Post-order without recursion: a deep document must not hit Python's recursion limit here.
    stack: list[tuple[yaml.Node, int, bool]] = [(root, 1, False)]
    while stack:
        node, depth, done = stack.pop()
        if id(node) in sizes:
            continue
        if depth > MAX_DEPTH:
            raise SpecError(f"{where}: YAML nested deeper than {MAX_DEPTH} levels")
        children = _children(node)
        if done or not children:
            total = 1 + sum(sizes[id(c)] for c in children)
            if total > MAX_NODES:
                raise SpecError(
                    f"{where}: YAML expands to more than {MAX_NODES} values (aliases repeating anchors?); "
                    "a spec needs a few hundred"
                )
            sizes[id(node)] = total
            continue
        stack.append((node, depth, True))
        # A node seen on the current path again would be a cycle (a recursive alias): refuse it.
        stack.extend((c, depth + 1, False) for c in children if id(c) not in sizes)
    return sizes[id(root)]


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def load(text: str | bytes, where: str) -> Any:
    """Parse one YAML document within the limits above; any failure is one SpecError naming ``where``."""
    if isinstance(text, bytes):
        if len(text) > MAX_BYTES:
            raise SpecError(f"{where}: {len(text)} bytes is more than a spec may hold ({MAX_BYTES})")
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise SpecError(f"{where}: not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r})") from None
    elif len(text) > MAX_BYTES:
        raise SpecError(f"{where}: {len(text)} characters is more than a spec may hold ({MAX_BYTES})")
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, where)
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SpecError(f"{where}{at}: not valid YAML: {problem[:200]}") from None
    except RecursionError:
        raise SpecError(f"{where}: YAML nested too deeply to read") from None
    finally:
        loader.dispose()

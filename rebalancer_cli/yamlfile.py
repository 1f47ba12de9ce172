"""Reading operator-written YAML so that every problem can be pointed at by line and column.

PyYAML's constructors lose positions, turn `0.1` into a float and let a duplicate key silently win; all
three cost money in a trading config. So files are composed into nodes and converted here: numbers become
exact `Decimal` built from the YAML text, duplicate keys are problems, and every value's position is kept
for error messages.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from .errors import InvalidFileError, Problem

try:  # the C composer is ~10x faster on large snapshots; fall back when libyaml is missing
    _Loader: Any = yaml.CSafeLoader
except AttributeError:  # pragma: no cover - depends on the PyYAML build
    _Loader = yaml.SafeLoader

PathKey = tuple[str | int, ...]
M = TypeVar("M", bound=BaseModel)

# far deeper than any config or snapshot needs (they nest 5 levels), far below what crashes libyaml
MAX_DEPTH = 64

_INT_RE = re.compile(r"^[-+]?(0|[1-9][0-9_]*)$")
_FLOAT_RE = re.compile(r"^[-+]?(\.[0-9]+|[0-9][0-9_]*(\.[0-9_]*)?)([eE][-+]?[0-9]+)?$")


@dataclass
class Located:
    """A plain Python document plus the position of each value and key, by path."""

    data: Any
    file: str
    positions: dict[PathKey, tuple[int, int]] = field(default_factory=dict)
    key_positions: dict[PathKey, tuple[int, int]] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    # how many more values alias expansion may produce (see `_check_shape`)
    budget: int = 10_000_000

    def where(self, path: PathKey, *, key: bool = False) -> tuple[int, int]:
        """Position of `path`, or of its nearest located ancestor when the value is missing."""
        table = self.key_positions if key else self.positions
        p = path
        while p:
            if p in table:
                return table[p]
            if p in self.positions:
                return self.positions[p]
            p = p[:-1]
        return self.positions.get((), (1, 1))

    def problem(self, path: PathKey, message: str, *, key: bool = False) -> Problem:
        line, col = self.where(path, key=key)
        return Problem(self.file, line, col, render_path(path), message)


def render_path(path: Iterable[str | int]) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out


def read_text(path: Path, *, kind: str, max_bytes: int) -> str:
    """Read a file an operator pointed us at, turning every way it can be unusable into one clear line."""
    name = str(path)

    def fail(message: str) -> InvalidFileError:
        return InvalidFileError([Problem(name, 0, 0, "", message)])

    try:
        if path.is_dir():
            raise fail(f"is a directory, not a {kind} file")
        size = path.stat().st_size
        if size > max_bytes:
            raise fail(f"is {size / 1e6:.1f} MB; a {kind} file is at most {max_bytes / 1e6:.0f} MB")
        # read at most one byte past the limit: a device or a pipe (/dev/zero, a FIFO) reports size 0
        with path.open("rb") as f:
            raw = f.read(max_bytes + 1)
        if len(raw) > max_bytes:
            raise fail(f"is larger than {max_bytes / 1e6:.0f} MB, the most a {kind} file may be")
    except FileNotFoundError:
        raise fail(f"no such {kind} file") from None
    except PermissionError:
        raise fail(f"permission denied reading the {kind} file") from None
    except OSError as exc:
        raise fail(f"cannot read the {kind} file: {exc.strerror or exc}") from None
    if b"\x00" in raw:
        raise fail(f"is binary, not a YAML {kind} file")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise fail(f"is not UTF-8 text (invalid byte at offset {exc.start}); a {kind} file is YAML") from None
    if not text.strip():
        raise fail(f"is empty; a {kind} file needs at least the required keys")
    return text


def load(path: Path, *, kind: str, max_bytes: int = 1_000_000) -> Located:
    """Compose and convert a YAML file; raises `InvalidFileError` for unreadable or unparsable input."""
    text = read_text(path, kind=kind, max_bytes=max_bytes)
    return loads(text, file=str(path), kind=kind)


def loads(text: str, *, file: str, kind: str) -> Located:
    try:
        budget = _check_shape(text, file)
        node = yaml.compose(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (0, 0)
        # PyYAML splits a reason into context ("while parsing a flow sequence") and problem; both help
        parts = [part for part in (exc.context, exc.problem) if part]
        reason = ", ".join(parts) or "invalid YAML"
        if "maximum nesting depth" in reason:
            # newer libyaml refuses deep nesting itself, scanning ahead of our own check: say it our way
            raise InvalidFileError([Problem(file, line, col, "", f"nested deeper than {MAX_DEPTH} levels")]) from None
        raise InvalidFileError([Problem(file, line, col, "", f"not valid YAML: {_one_line(reason)}")]) from None
    except yaml.reader.ReaderError as exc:
        # a forbidden character: its message spans lines and counts characters; give line:col instead
        # the reader stops at the first such character; libyaml counts its offset in bytes, PyYAML in characters
        at = text.find(chr(exc.character)) if isinstance(exc.character, int) else -1
        at = at if at >= 0 else min(exc.position, len(text))
        line = text.count("\n", 0, at) + 1
        col = at - (text.rfind("\n", 0, at) + 1) + 1
        code = f"#x{exc.character:04x}" if isinstance(exc.character, int) else repr(exc.character)
        reason = f"unacceptable character {code}: {exc.reason}"
        raise InvalidFileError([Problem(file, line, col, "", f"not valid YAML: {reason}")]) from None
    except yaml.YAMLError as exc:
        raise InvalidFileError([Problem(file, 0, 0, "", f"not valid YAML: {_one_line(str(exc))}")]) from None
    if node is None:
        raise InvalidFileError([Problem(file, 0, 0, "", f"is empty; a {kind} file needs the required keys")])
    located = Located(data=None, file=file, budget=budget)
    located.data = _convert(node, (), located)
    if not isinstance(located.data, dict):
        if isinstance(located.data, list):
            what = "a list"
        else:
            shown = str(located.data) if isinstance(located.data, Decimal | str) else repr(located.data)
            what = f"a single value ({printable(shown[:40])})"
        raise InvalidFileError(
            [
                Problem(
                    file,
                    node.start_mark.line + 1,
                    node.start_mark.column + 1,
                    "",
                    f"the top level of a {kind} file must be a mapping of keys, not {what}",
                )
            ]
        )
    return located


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _check_shape(text: str, file: str) -> int:
    """Refuse pathological nesting before composing, and size the budget for alias expansion.

    libyaml's composer recurses in C (a few thousand `[` crash the process) and its scanner slows down
    with the square of the nesting depth, so depth is checked on the event stream, which stops at the first
    level too deep. Returns how many values the document may expand to through aliases (a "billion laughs"
    file is a few lines that expand to billions).
    """
    depth = 0
    nodes = 0
    for event in yaml.parse(text, Loader=_Loader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                mark = event.start_mark
                line, col = (mark.line + 1, mark.column + 1) if mark is not None else (0, 0)
                raise InvalidFileError([Problem(file, line, col, "", f"nested deeper than {MAX_DEPTH} levels")])
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
        if isinstance(event, yaml.NodeEvent):
            nodes += 1
    return 2 * nodes + 10_000


def _convert(node: yaml.Node, path: PathKey, doc: Located) -> Any:
    doc.positions[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
    doc.budget -= 1
    if len(path) > MAX_DEPTH or doc.budget < 0:
        # only aliases get here: an alias of an ancestor (recursive) or aliases of aliases (a "billion laughs")
        what = f"nested deeper than {MAX_DEPTH} levels" if len(path) > MAX_DEPTH else "too large"
        line, col = doc.positions[path]
        raise InvalidFileError([Problem(doc.file, line, col, "", f"YAML aliases make the document {what}")])
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                doc.problems.append(doc.problem(path, "YAML merge keys (<<) are not supported"))
                continue
            key = _scalar(key_node, doc) if isinstance(key_node, yaml.ScalarNode) else None
            key_text = str(key) if key is not None and not isinstance(key, dict | list) else None
            if key_text is None:
                doc.problems.append(
                    Problem(
                        doc.file,
                        key_node.start_mark.line + 1,
                        key_node.start_mark.column + 1,
                        render_path(path),
                        "keys must be plain text",
                    )
                )
                continue
            child = (*path, key_text)
            kpos = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            if key_text in out:
                first = doc.key_positions.get(child, (0, 0))
                doc.problems.append(
                    Problem(
                        doc.file,
                        kpos[0],
                        kpos[1],
                        render_path(child),
                        f"duplicate key (first on line {first[0]}); a repeated key would silently override the first",
                    )
                )
                continue
            doc.key_positions[child] = kpos
            out[key_text] = _convert(value_node, child, doc)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_convert(item, (*path, i), doc) for i, item in enumerate(node.value)]
    assert isinstance(node, yaml.ScalarNode)
    return _scalar(node, doc)


def _scalar(node: yaml.ScalarNode, doc: Located) -> Any:
    """Resolve a scalar the way YAML 1.1 would, except that numbers become exact Decimals."""
    tag, value = node.tag, node.value
    if node.style in ("'", '"', "|", ">") or tag == "tag:yaml.org,2002:str":
        return value
    if tag == "tag:yaml.org,2002:null":
        return None
    if tag == "tag:yaml.org,2002:bool":
        return value.lower() in ("true", "yes", "on", "y")
    if tag in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float"):
        text = value.replace("_", "")
        if _INT_RE.match(value) or _FLOAT_RE.match(value):
            try:
                number = Decimal(text)
            except InvalidOperation:  # pragma: no cover - the regexes admit only valid text
                return value
            if number.is_finite():
                return number
        lowered = text.lower()
        if lowered in (".inf", "+.inf", "-.inf", ".nan"):
            return NonFinite(value)
        # sexagesimal (1:30), octal (0o17), hex (0x1f): legal YAML 1.1, never meant in a money config
        return value
    return value


class NonFinite(str):
    """`.inf` / `.nan` kept as text so that validation can name it instead of accepting infinity."""

    __slots__ = ()


# --- validation against a pydantic model, with every problem located -------------------------------


def validate(model: type[M], doc: Located) -> M:
    """Validate `doc` against `model`, reporting every problem (YAML ones included) with its position."""
    problems = list(doc.problems)
    result: M | None = None
    try:
        result = model.model_validate(doc.data)
    except ValidationError as exc:
        for err in exc.errors(include_url=False):
            problems.append(_problem_from(model, doc, err))
    if problems:
        problems.sort(key=lambda p: (p.line, p.column))
        # keys and values quoted in messages come from the file: a newline in one must not split the line
        problems = [replace(p, path=printable(p.path), message=printable(p.message)) for p in problems]
        raise InvalidFileError(problems)
    assert result is not None
    return result


def printable(text: str) -> str:
    """`text` with control characters escaped (a newline as \\n), so that one problem is one line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _problem_from(model: type[BaseModel], doc: Located, err: ErrorDetails) -> Problem:
    loc: PathKey = tuple(part for part in err["loc"] if isinstance(part, str | int))
    # pydantic adds the validator's name to loc for union/function validators; keep only real keys
    loc = _real_path(doc.data, loc)
    kind = err["type"]
    if "[key]" in err["loc"]:
        return doc.problem(loc, err["msg"].removeprefix("Value error, "), key=True)
    if kind == "extra_forbidden":
        name = str(loc[-1])
        known = _known_keys(model, loc[:-1])
        hint = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        message = "unknown key" + (f"; did you mean '{hint[0]}'?" if hint else "")
        if known and not hint:
            message += f" (known keys: {', '.join(sorted(known))})"
        return doc.problem(loc, message, key=True)
    if kind == "missing":
        return doc.problem(loc, "required key is missing", key=True)
    message = err["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    message = message[:1].lower() + message[1:]
    got = err.get("input")
    secret = any(isinstance(part, str) and "credential" in part for part in loc)
    if kind not in ("model_type", "dict_type", "list_type") and _is_shown(got) and not secret:
        message += f" (got {_show(got)})"
    return doc.problem(loc, message)


def _real_path(data: Any, loc: PathKey) -> PathKey:
    out: list[str | int] = []
    node = data
    for part in loc:
        in_dict = isinstance(node, dict) and isinstance(part, str) and part in node
        if in_dict or (isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)):
            node = node[part]
            out.append(part)
        elif isinstance(node, dict) and isinstance(part, str) and not any(c in part for c in "[]()-,"):
            out.append(part)  # a missing or unknown key: keep its name
            node = None
        # else: a validator name inserted by pydantic; skip it
    return tuple(out)


def _known_keys(model: type[BaseModel], path: PathKey) -> list[str]:
    annotation: Any = model
    for part in path:
        annotation = _unwrap(annotation)
        fields = getattr(annotation, "model_fields", None)
        if fields is not None and isinstance(part, str):
            if part not in fields:
                return []
            annotation = fields[part].annotation
            continue
        args = typing.get_args(annotation)
        origin = typing.get_origin(annotation)
        if origin is dict and len(args) == 2:
            annotation = args[1]
        elif origin is list and args:
            annotation = args[0]
        else:
            return []
    fields = getattr(_unwrap(annotation), "model_fields", None)
    return [name for name, f in fields.items() if not f.exclude] if fields else []


def _unwrap(annotation: Any) -> Any:
    """Strip Optional/Annotated so that `X | None` leads to the model X."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            if arg is not type(None):
                return _unwrap(arg)
    return annotation


def _is_shown(value: Any) -> bool:
    return value is not None and not isinstance(value, dict | list)


def _show(value: Any) -> str:
    text = str(value) if isinstance(value, Decimal | int | str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."

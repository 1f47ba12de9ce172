"""Prices CSV files: loading with located errors, and writing that loads back exactly.

A prices file is validated with the same care as a config: a wrong price in row 300,000 of a backtest input
silently changes the policy we recommend, so every problem is reported with its line and column, all in one
run.
"""

from __future__ import annotations

import itertools
import operator
import re
from array import array
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from pathlib import Path

from ..errors import InvalidFileError, PricesError, Problem
from ..fsutil import atomic_write_text
from ..yamlfile import read_text
from .series import MAX_DECIMALS, OHLC_FIELDS, Column, PriceSeries

MAX_PRICES_BYTES = 256_000_000
MAX_PROBLEMS = 50
# unix seconds outside this range are far more likely milliseconds or a yyyymmdd number than a real time
_UNIX_MIN = 946_684_800  # 2000-01-01
_UNIX_MAX = 4_102_444_800  # 2100-01-01
_INT64_MAX = 2**63 - 1
_CHUNK_CHARS = 4_000_000
_POW10 = tuple(10**k for k in range(MAX_DECIMALS + 1))
# same rule as asset symbols in the config: a column must be able to match a configured asset
_SYMBOL_RE = re.compile(r"^[A-Z0-9][A-Z0-9.\-_]{0,19}$")
_TIME_COLUMNS = ("timestamp", "date")

_Where = Callable[[int], int]  # row index in a chunk -> line number
_Position = Callable[[int, int], int]  # (row index, field index) -> column number
_Compare = Callable[[int, int], bool]


# --- loading ----------------------------------------------------------------------------------------


def load_prices(path: Path) -> PriceSeries:
    """Load and validate a prices CSV; raises `PricesError` listing every problem with line and column."""
    name = str(path)
    try:
        text = read_text(path, kind="prices", max_bytes=MAX_PRICES_BYTES)
    except InvalidFileError as exc:
        raise PricesError([_as_csv_problem(p) for p in exc.problems]) from None
    return _Loader(name).load(text)


def _as_csv_problem(problem: Problem) -> Problem:
    """`read_text` words its messages for YAML files; a prices file is CSV."""
    message = (
        problem.message.replace("YAML ", "CSV ")
        .replace("is YAML", "is CSV")
        .replace("needs at least the required keys", "needs a header line and rows of prices")
    )
    return Problem(problem.file, problem.line, problem.column, problem.path, message)


@dataclass(frozen=True)
class _ColumnSpec:
    index: int
    name: str
    asset: str
    field: str
    column: int  # 1-based character position in the header


class _Problems:
    """Keeps the first MAX_PROBLEMS by position and counts the rest; rows arrive in file order."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.kept: list[Problem] = []
        self.total = 0

    def add_batch(self, batch: list[Problem]) -> None:
        if not batch:
            return
        self.total += len(batch)
        room = MAX_PROBLEMS - len(self.kept)
        if room > 0:
            batch.sort(key=lambda p: (p.line, p.column))
            self.kept.extend(batch[:room])

    def raise_if_any(self) -> None:
        if not self.total:
            return
        problems = list(self.kept)
        if self.total > len(problems):
            problems.append(Problem(self.file, 0, 0, "", f"and {self.total - len(problems)} more problems"))
        raise PricesError(problems)


class _Loader:
    def __init__(self, file: str) -> None:
        self.file = file
        self.problems = _Problems(file)
        self.specs: list[_ColumnSpec] = []
        self.time_name = "timestamp"
        self.ncols = 0
        self.stamps: list[array[int]] = []
        self.chunks: dict[tuple[str, str], list[Column]] = {}
        self.prev_ts: int | None = None
        self.prev_line = 0
        self.prev_text = ""
        self.rows = 0

    def problem(self, line: int, column: int, path: str, message: str, got: str | None = None) -> Problem:
        if got:
            message += f" (got {got if len(got) <= 60 else got[:57] + '...'})"
        return Problem(self.file, line, column, path, message)

    def load(self, text: str) -> PriceSeries:
        if "\r" in text:
            text = text.replace("\r\n", "\n")
        # the header is the first line that is not blank
        pos, line_no = 0, 1
        while True:
            end = text.find("\n", pos)
            end = len(text) if end == -1 else end
            if text[pos:end].strip() or end >= len(text):
                break
            pos, line_no = end + 1, line_no + 1
        self.header(text[pos:end], line_no)
        self.problems.raise_if_any()
        pos, line_no = end + 1, line_no + 1
        while pos < len(text):
            end = text.find("\n", pos + _CHUNK_CHARS)
            end = len(text) if end == -1 else end
            lines = text[pos:end].split("\n")
            self.chunk(lines, line_no)
            pos, line_no = end + 1, line_no + len(lines)
        if not self.problems.total and self.rows < 2:
            got = "no rows" if not self.rows else "one row"
            self.problems.add_batch([self.problem(0, 0, "", f"needs at least two rows of prices; it has {got}")])
        self.problems.raise_if_any()
        return self.build()

    # --- header -------------------------------------------------------------------------------------

    def header(self, line: str, line_no: int) -> None:
        raw = line.split(",")
        names = [_unquote(f) for f in raw]
        cols = _field_columns(raw)
        self.ncols = len(raw)
        problems: list[Problem] = []
        first = names[0]
        if first.lower() not in _TIME_COLUMNS:
            if first and _parse_time(first) is not None:
                message = "no header: the first line must name the columns, e.g. timestamp,BTC,ETH"
                self.problems.add_batch([self.problem(line_no, 1, "", message)])
                return
            problems.append(self.problem(line_no, 1, "", "the first column must be named timestamp or date", got=first))
        self.time_name = first or "timestamp"
        seen: dict[tuple[str, str], _ColumnSpec] = {}
        for index in range(1, len(names)):
            name, col = names[index], cols[index]
            asset, field = _split_column(name)
            message = _column_name_problem(name, asset)
            if message:
                problems.append(self.problem(line_no, col, name, message, got=name))
                continue
            spec = _ColumnSpec(index, name, asset, field, col)
            if (asset, field) in seen:
                prior = seen[(asset, field)]
                same = "" if prior.name == name else f" ({prior.name})"
                problems.append(
                    self.problem(
                        line_no,
                        col,
                        name,
                        f"duplicate column: the {field} price of {asset} is already column {prior.index + 1}{same}",
                    )
                )
                continue
            seen[(asset, field)] = spec
            self.specs.append(spec)
        if len(names) < 2 and not problems:
            problems.append(self.problem(line_no, len(line) + 1, "", "no asset columns; e.g. timestamp,BTC,ETH"))
        by_asset: dict[str, list[_ColumnSpec]] = {}
        for spec in self.specs:
            by_asset.setdefault(spec.asset, []).append(spec)
        for asset, specs in by_asset.items():
            if not any(s.field == "close" for s in specs):
                problems.append(
                    self.problem(
                        line_no,
                        specs[0].column,
                        specs[0].name,
                        f"{asset} has {'/'.join(s.field for s in specs)} columns but no {asset}_close; "
                        "the close values the portfolio",
                    )
                )
        self.problems.add_batch(problems)
        for spec in self.specs:
            self.chunks[(spec.asset, spec.field)] = []

    # --- rows ---------------------------------------------------------------------------------------

    def chunk(self, lines: list[str], first_line: int) -> None:
        n = self.ncols
        problems: list[Problem] = []
        counts = [line.count(",") for line in lines]
        line_nos: list[int] | None = None
        if counts.count(n - 1) != len(lines):
            kept, line_nos = [], []
            for k, (line, count) in enumerate(zip(lines, counts, strict=True)):
                if count == n - 1:
                    kept.append(line)
                    line_nos.append(first_line + k)
                elif line.strip():
                    problems.append(self.field_count_problem(line, first_line + k, count + 1))
            lines = kept
        if not lines:
            self.problems.add_batch(problems)
            return
        flat = ",".join(lines).split(",")
        columns = [flat[k::n] for k in range(n)]

        def where(r: int) -> int:
            return line_nos[r] if line_nos is not None else first_line + r

        def position(r: int, index: int) -> int:
            return _field_columns(lines[r].split(","))[index]

        stamps = self.chunk_times(columns[0], where, position, problems)
        converted: dict[tuple[str, str], Column] = {}
        for spec in self.specs:
            column = self.chunk_prices(columns[spec.index], spec, where, position, problems)
            if column is not None:
                converted[(spec.asset, spec.field)] = column
        if not problems and stamps is not None:
            self.check_ohlc(converted, columns, where, position, problems)
        self.problems.add_batch(problems)
        self.rows += len(lines)
        if self.problems.total:
            return  # nothing will be built; keep only counting problems
        assert stamps is not None
        self.stamps.append(stamps)
        for key, column in converted.items():
            self.chunks[key].append(column)

    def field_count_problem(self, line: str, line_no: int, got: int) -> Problem:
        n = self.ncols
        header = f"the header has {n} ({self.time_name}, {', '.join(s.name for s in self.specs)})"
        if got > n:
            column = _field_columns(line.split(","))[n]
            return self.problem(line_no, column, "", f"row has {got} fields; {header}")
        return self.problem(line_no, len(line) + 1, "", f"row has {got} fields; {header}")

    def chunk_times(
        self,
        cells: list[str],
        where: _Where,
        position: _Position,
        problems: list[Problem],
    ) -> array[int] | None:
        fast = _fast_times(cells)
        values: list[int | None]
        if fast is not None:
            values = list(fast)
            prev = self.prev_ts
            if (prev is None or fast[0] > prev) and all(map(operator.lt, fast, itertools.islice(fast, 1, None))):
                self.prev_ts, self.prev_line, self.prev_text = fast[-1], where(len(fast) - 1), cells[-1]
                return array("q", fast)
        else:
            values = []
            for r, cell in enumerate(cells):
                text = _unquote(cell)
                message = _time_problem(text)
                if message:
                    problems.append(self.problem(where(r), position(r, 0), self.time_name, message, got=text))
                values.append(None if message else _parse_time(text))
        # strictly increasing, across chunk boundaries too; compared with the last valid timestamp
        bad = False
        for r, stamp in enumerate(values):
            if stamp is None:
                bad = True
                continue
            text = _unquote(cells[r])
            prev = self.prev_ts
            if prev is not None and stamp <= prev:
                bad = True
                message = (
                    f"duplicate timestamp (same as line {self.prev_line})"
                    if stamp == prev
                    else f"timestamps must increase; this one is before line {self.prev_line}'s ({self.prev_text})"
                )
                problems.append(self.problem(where(r), position(r, 0), self.time_name, message, got=text))
            self.prev_ts, self.prev_line, self.prev_text = stamp, where(r), text
        return None if bad else array("q", (v for v in values if v is not None))

    def chunk_prices(
        self,
        cells: list[str],
        spec: _ColumnSpec,
        where: _Where,
        position: _Position,
        problems: list[Problem],
    ) -> Column | None:
        fast = _fast_prices(cells)
        if fast is not None:
            values, scale = fast
            return array("q", values), scale
        scaled: list[tuple[int, int]] = []
        bad = False
        for r, cell in enumerate(cells):
            text = _unquote(cell)
            parsed = _parse_price(text)
            if isinstance(parsed, str):
                problems.append(self.problem(where(r), position(r, spec.index), spec.name, parsed, got=text))
                bad = True
            else:
                scaled.append(parsed)
        if bad:
            return None
        scale = max(s for _, s in scaled)
        try:
            return array("q", (v * _POW10[scale - s] for v, s in scaled)), scale
        except OverflowError:
            for r, (v, s) in enumerate(scaled):
                if v * _POW10[scale - s] > _INT64_MAX:
                    problems.append(
                        self.problem(
                            where(r),
                            position(r, spec.index),
                            spec.name,
                            f"too many digits to store exactly next to prices with {scale} decimals",
                            got=_unquote(cells[r]),
                        )
                    )
                    break
            return None

    def check_ohlc(
        self,
        converted: Mapping[tuple[str, str], Column],
        cells: list[list[str]],
        where: _Where,
        position: _Position,
        problems: list[Problem],
    ) -> None:
        """A high below the close or a low above it is a shifted or swapped column, not a market."""
        specs = {(s.asset, s.field): s for s in self.specs}
        for asset in dict.fromkeys(s.asset for s in self.specs):
            have = {f: converted[(asset, f)] for f in OHLC_FIELDS if (asset, f) in converted}
            if "high" not in have and "low" not in have:
                continue
            scale = max(s for _, s in have.values())
            common = {f: [v * _POW10[scale - s] for v in vals] for f, (vals, s) in have.items()}
            checks: list[tuple[str, str, _Compare]] = []
            if "high" in common:
                checks += [(f, "high", operator.gt) for f in ("open", "low", "close") if f in common]
            if "low" in common:
                checks += [(f, "low", operator.lt) for f in ("open", "close") if f in common]
            for field, bound, beyond in checks:
                if not any(map(beyond, common[field], common[bound])):
                    continue
                bad_rows = [
                    r for r, (v, b) in enumerate(zip(common[field], common[bound], strict=True)) if beyond(v, b)
                ]
                spec = specs[(asset, field)]
                bspec = specs[(asset, bound)]
                word = "above" if bound == "high" else "below"
                for r in bad_rows:
                    limit = _unquote(cells[bspec.index][r])
                    problems.append(
                        self.problem(
                            where(r),
                            position(r, spec.index),
                            spec.name,
                            f"{word} {bspec.name} {limit} on the same row; are the columns in the wrong order?",
                            got=_unquote(cells[spec.index][r]),
                        )
                    )

    def build(self) -> PriceSeries:
        stamps: array[int] = array("q")
        for part in self.stamps:
            stamps.extend(part)
        columns: dict[str, dict[str, Column]] = {}
        problems: list[Problem] = []
        for spec in self.specs:
            parts = self.chunks[(spec.asset, spec.field)]
            scale = max(s for _, s in parts)
            values: array[int] = array("q")
            try:
                for part, s in parts:
                    values.extend(part if s == scale else array("q", (v * _POW10[scale - s] for v in part)))
            except OverflowError:
                problems.append(
                    self.problem(
                        0,
                        0,
                        spec.name,
                        f"prices with up to {scale} decimals and this many digits cannot be stored exactly; "
                        "round the prices with the most decimals",
                    )
                )
                continue
            columns.setdefault(spec.asset, {})[spec.field] = (values, scale)
        self.problems.add_batch(problems)
        self.problems.raise_if_any()
        ordered = {asset: {f: columns[asset][f] for f in OHLC_FIELDS if f in columns[asset]} for asset in columns}
        return PriceSeries(stamps, ordered, source=self.file)


def _unquote(field: str) -> str:
    text = field.strip()
    if len(text) >= 2 and text[0] == text[-1] == '"':
        return text[1:-1].strip()
    return text


def _field_columns(raw: list[str]) -> list[int]:
    """1-based character column where each comma-separated field starts."""
    out, col = [], 1
    for field in raw:
        out.append(col)
        col += len(field) + 1
    return out


def _split_column(name: str) -> tuple[str, str]:
    base, sep, suffix = name.rpartition("_")
    if sep and suffix in OHLC_FIELDS and base:
        return base, suffix
    return name, "close"


def _column_name_problem(name: str, asset: str) -> str:
    if not name:
        return "empty column name; every column after the first names an asset, e.g. BTC"
    if _SYMBOL_RE.match(asset):
        return ""
    base, sep, suffix = name.rpartition("_")
    if sep and base and suffix.lower() in OHLC_FIELDS:
        return f"open/high/low/close suffixes are lower case; did you mean '{base.upper()}_{suffix.lower()}'?"
    if _SYMBOL_RE.match(asset.upper()):
        return f"asset symbols are upper case; did you mean '{name.replace(asset, asset.upper(), 1)}'?"
    return "not an asset column: columns are an asset symbol (BTC) or its BTC_open, BTC_high, BTC_low, BTC_close"


def _fast_prices(cells: list[str]) -> tuple[list[int], int] | None:
    """Plain positive decimals, checked and converted in C-speed passes over the whole column.

    None sends the column to the careful path, which finds and locates whatever is wrong.
    """
    joined = "\n".join(cells)
    if not joined.isascii() or max(map(len, cells)) > _FAST_MAX_CHARS:
        return None  # the careful path reports a number too long to be a price, with its line
    body = joined.replace(".", "")
    if not body.replace("\n", "").isdigit():
        return None
    first = cells[0]
    dot = first.find(".")
    decimals = len(first) - dot - 1 if dot >= 0 else 0
    dots = len(joined) - len(body)
    values: list[int]
    uniform = (
        dots == (len(cells) if decimals else 0)
        and min(map(len, cells)) >= (decimals + 2 if decimals else 1)
        and (not decimals or set(map(operator.itemgetter(-decimals - 1), cells)) == {"."})
    )
    if uniform:  # every cell has exactly `decimals` decimals after at least one digit
        values = list(map(int, body.split("\n")))
        scale = decimals
    else:
        parts = [c.partition(".") for c in cells]
        if any("." in f or not (w or f) for w, _, f in parts):
            return None
        scale = max(len(f) for _, _, f in parts)
        values = [int(w + f) * _POW10[scale - len(f)] for w, _, f in parts] if scale <= MAX_DECIMALS else []
    if scale > MAX_DECIMALS or min(values) <= 0 or max(values) > _INT64_MAX:
        return None
    return values, scale


# A price that fits a signed 64-bit integer at its scale has at most 19 digits, plus a point: anything longer
# cannot be stored exactly (and a 5,001-digit one would trip Python's int-conversion limit).
_FAST_MAX_CHARS = 40
_INT64_DIGITS = 19


def _parse_price(text: str) -> tuple[int, int] | str:
    """(value, scale) or the problem with the text."""
    if not text:
        return "missing price"
    if len(text) > _FAST_MAX_CHARS:
        return "too many digits to store exactly"
    try:
        number = Decimal(text)
    except InvalidOperation:
        return "not a number"
    if not number.is_finite():
        return "must be a finite number"
    if number <= 0:
        return "must be above 0"
    if number.adjusted() > _INT64_DIGITS:  # 9e999999999: no price, and scaling it would overflow Decimal
        return "too many digits to store exactly"
    exponent = number.as_tuple().exponent
    assert isinstance(exponent, int)
    scale = max(0, -exponent)
    if scale > MAX_DECIMALS:
        return f"more than {MAX_DECIMALS} decimals"
    value = int(number.scaleb(scale))
    if value > _INT64_MAX:
        return "too many digits to store exactly"
    return value, scale


_DATE_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_CLOCK_RE = re.compile(r"([0-9]{2}):([0-9]{2}):([0-9]{2})")
_SEPARATORS = frozenset(("T", " "))
_UTC_SUFFIXES = frozenset(("Z", "+00:00", ""))


def _fast_times(cells: list[str]) -> list[int] | None:
    """Unix seconds or UTC ISO times in bulk; None sends the column to the careful path."""
    try:
        joined = "".join(cells)
        if joined.isascii() and joined.isdigit():
            values = list(map(int, cells))
            if min(values) < _UNIX_MIN or max(values) >= _UNIX_MAX:
                return None
            return values
        # a year of minute bars has 365 distinct dates and 1440 distinct times: check and parse each once
        days = {d: _date_seconds(d) for d in {c[:10] for c in cells}}
        shapes = {(c[10:11], c[19:]) for c in cells}
        if all(not sep and not rest for sep, rest in shapes):  # dates only
            return [days[c] for c in cells]
        if not all(sep in _SEPARATORS and rest in _UTC_SUFFIXES for sep, rest in shapes):
            return [_iso_seconds(c) for c in cells]  # another offset or fractions: the general parser
        clock = {t: _clock_seconds(t) for t in {c[11:19] for c in cells}}
        return [days[c[:10]] + clock[c[11:19]] for c in cells]
    except ValueError:
        return None


def _date_seconds(text: str) -> int:
    if not _DATE_RE.fullmatch(text):
        raise ValueError(text)
    return (date.fromisoformat(text) - date(1970, 1, 1)).days * 86_400


def _clock_seconds(text: str) -> int:
    match = _CLOCK_RE.fullmatch(text)
    if not match:
        raise ValueError(text)
    h, m, s = (int(g) for g in match.groups())
    if h > 23 or m > 59 or s > 59:
        raise ValueError(text)
    return h * 3600 + m * 60 + s


def _iso_seconds(text: str) -> int:
    parsed = datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    if parsed.microsecond:
        raise ValueError("fractional seconds")
    return int(parsed.timestamp())


def _parse_time(text: str) -> int | None:
    if text.isascii() and text.isdigit():
        value = int(text)
        return value if _UNIX_MIN <= value < _UNIX_MAX else None
    try:
        return _iso_seconds(text)
    except (ValueError, OverflowError):
        return None


def _time_problem(text: str) -> str:
    if not text:
        return "missing timestamp"
    if text.isascii() and text.isdigit():
        value = int(text)
        if _UNIX_MIN * 1000 <= value < _UNIX_MAX * 1000:
            return "unix time must be in seconds; this looks like milliseconds"
        if not _UNIX_MIN <= value < _UNIX_MAX:
            return "unix seconds must fall between 2000-01-01 and 2100-01-01"
        return ""
    try:
        _iso_seconds(text)
    except ValueError as exc:
        if str(exc) == "fractional seconds":
            return "timestamps are whole seconds"
        return "not a date, date-time (ISO 8601) or unix seconds"
    except OverflowError:
        return "not a date, date-time (ISO 8601) or unix seconds"
    return ""


# --- writing ----------------------------------------------------------------------------------------


def write_prices(series: PriceSeries, path: Path) -> None:
    """Write the CSV atomically; loading it back gives the same timestamps and the same exact prices."""
    atomic_write_text(path, dump_prices(series))


def dump_prices(series: PriceSeries) -> str:
    stamps = series.timestamps
    daily = all(t % 86_400 == 0 for t in stamps)
    header = ["date" if daily else "timestamp"]
    texts: list[Iterable[str]] = [_format_dates(stamps) if daily else _format_times(stamps)]
    for asset in series.assets:
        fields = series.fields(asset)
        for field in fields:
            header.append(asset if fields == ("close",) else f"{asset}_{field}")
            values, scale = series.raw(asset, field)
            texts.append(_format_prices(values, scale))
    lines = [",".join(header), *map(",".join, zip(*texts, strict=True))]
    return "\n".join(lines) + "\n"


def _format_prices(values: array[int], scale: int) -> list[str]:
    if scale == 0:
        return list(map(str, values))
    out = []
    for v in values:
        t = str(v)
        if len(t) <= scale:
            t = t.rjust(scale + 1, "0")
        out.append(f"{t[:-scale]}.{t[-scale:]}")
    return out


def _format_dates(stamps: array[int]) -> list[str]:
    epoch = date(1970, 1, 1)
    return [(epoch + timedelta(days=t // 86_400)).isoformat() for t in stamps]


def _format_times(stamps: array[int]) -> list[str]:
    days: dict[int, str] = {}
    clock: dict[int, str] = {}
    out = []
    for t in stamps:
        day, second = divmod(t, 86_400)
        prefix = days.get(day)
        if prefix is None:
            prefix = days[day] = (date(1970, 1, 1) + timedelta(days=day)).isoformat() + "T"
        suffix = clock.get(second)
        if suffix is None:
            h, rest = divmod(second, 3600)
            suffix = clock[second] = f"{h:02d}:{rest // 60:02d}:{rest % 60:02d}Z"
        out.append(prefix + suffix)
    return out

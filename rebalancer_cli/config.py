"""The portfolio config: a strict schema with exact decimals and located errors.

Every command (validate-config, plan, execute, daemon, backtest) loads configs through `load_config`, so
a typo that one command would reject can never slip through another.
"""

from __future__ import annotations

import os
import re
from decimal import Decimal
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, WithJsonSchema
from pydantic_core import PydanticCustomError

from . import yamlfile
from .decimals import (
    BaseThreshold,
    Correlation,
    FeeRate,
    Fraction,
    Positive,
    RiskAversion,
    SafetyMargin,
    VolatilityFactor,
    to_decimal,
)
from .errors import ConfigError, InvalidFileError, Problem

MAX_CONFIG_BYTES = 1_000_000
WEIGHT_TOLERANCE = Decimal("0.0001")

# Currencies that settle, rather than speculate: the quote is inferred when exactly one asset is one of them.
STABLE_OR_FIAT = frozenset(
    {
        "USD",
        "EUR",
        "GBP",
        "JPY",
        "CHF",
        "CAD",
        "AUD",
        "USDT",
        "USDC",
        "DAI",
        "BUSD",
        "TUSD",
        "FDUSD",
        "USDP",
        "PYUSD",
        "EURC",
        "EURT",
        "USDE",
        "GUSD",
        "USDS",
        "RLUSD",
    }
)

_SYMBOL_RE = re.compile(r"^[A-Z0-9][A-Z0-9.\-_]{0,19}$")
_PORTFOLIO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,63}$")
_ENV_NAME_RE = re.compile(r"^[A-Z_][A-Z0-9_]{0,127}$")
_EXCHANGE_ID_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_CREDENTIAL_FIELDS = ("apiKey", "secret", "password", "uid", "privateKey", "walletAddress", "token")


def _symbol(value: str) -> str:
    if not _SYMBOL_RE.match(value):
        if _SYMBOL_RE.match(value.upper()):
            raise ValueError(f"symbols are upper case; did you mean '{value.upper()}'?")
        raise ValueError("must be an asset symbol such as BTC (letters and digits, at most 20)")
    return value


def _portfolio_id(value: str) -> str:
    if not _PORTFOLIO_RE.match(value):
        raise ValueError("must be 1-64 letters, digits, '.', '_' or '-' (it names keys in the stores)")
    return value


def _duration(value: Any) -> Decimal:
    """Seconds, from a number or text such as `90`, `15m`, `1h`; durations never need float."""
    if isinstance(value, bool):
        raise ValueError("must be a duration such as 30s, 15m or 1h")
    if isinstance(value, Decimal | int):
        seconds = to_decimal(value)
    elif isinstance(value, str) and (m := _DURATION_RE.match(value)):
        units = {
            "ms": Decimal("0.001"),
            "s": Decimal(1),
            "m": Decimal(60),
            "h": Decimal(3600),
            "d": Decimal(86400),
        }
        unit = units[m.group(2) or "s"]
        seconds = to_decimal(Decimal(m.group(1)) * unit)
    else:
        raise ValueError("must be a duration such as 30s, 15m or 1h")
    if seconds < 0:
        raise ValueError("must not be negative")
    return seconds


def _trade_count(value: Any) -> int:
    try:
        # quoted ("10") like every other number of the file; booleans and floats are refused there
        number = to_decimal(value)
    except PydanticCustomError:
        raise ValueError("must be a whole number between 1 and 50") from None
    if number != number.to_integral_value():
        raise ValueError("must be a whole number between 1 and 50")
    value = number
    if not 1 <= value <= 50:
        raise ValueError("must be between 1 and 50")
    return int(value)


Symbol = Annotated[str, AfterValidator(_symbol)]
Duration = Annotated[
    Decimal,
    BeforeValidator(_duration),
    WithJsonSchema({"type": ["number", "string"], "pattern": _DURATION_RE.pattern}),
]


class RebalanceTo(StrEnum):
    TARGET = "target"
    BAND_EDGE = "band_edge"


class RegionShape(StrEnum):
    """How no-trade regions weigh an asset's deviation: with the others' through the covariance, or alone."""

    JOINT = "joint"
    PER_ASSET = "per-asset"


class PolicyName(StrEnum):
    """The rule `plan`, `execute` and the daemon apply (README, "Choosing the default policy")."""

    COST_ADJUSTED = "cost-adjusted"
    NO_TRADE_REGION = "no-trade-region"


class AssetConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    symbol: Symbol = Field(description="Asset symbol as the exchange writes it, e.g. BTC")
    target_weight: Fraction = Field(description="Target share of the portfolio's value, 0..1")
    max_deviation: Fraction = Field(
        description="Hard band: beyond this drift the asset is traded whatever the cost or cooldown, 0..1"
    )


def _env_name(value: str) -> str:
    # The value is never repeated in a message: when it is a key pasted by mistake, errors get logged.
    if not _ENV_NAME_RE.match(value) or _looks_like_key(value):
        raise ValueError(
            "must be the NAME of an environment variable holding the credential (upper case, e.g. BINANCE_SECRET), "
            "never the credential itself"
        )
    return value


def _looks_like_key(value: str) -> bool:
    """An upper-case API key (hex, base32) passes the name pattern; names are short words joined by `_`."""
    words = value.split("_")
    return any(len(w) >= 32 or (len(w) >= 16 and sum(c.isdigit() for c in w) >= 2) for w in words)


def _credential_field(value: str) -> str:
    if value not in _CREDENTIAL_FIELDS:
        raise ValueError(f"'{value}' is not a ccxt credential field ({', '.join(_CREDENTIAL_FIELDS)})")
    return value


def _exchange_id(value: str) -> str:
    if not _EXCHANGE_ID_RE.match(value):
        raise ValueError("must be `paper` or a ccxt exchange id such as binance")
    return value


def _api_url(value: str) -> str:
    if not re.match(r"^https?://[^/\s]+", value):
        raise ValueError("must be an http(s) URL such as http://127.0.0.1:8900")
    return value


EnvName = Annotated[str, AfterValidator(_env_name)]
CredentialField = Annotated[str, AfterValidator(_credential_field)]


class ExchangeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: Annotated[str, AfterValidator(_exchange_id)] = Field(
        "paper", description="`paper` (embedded, from a snapshot file) or any ccxt exchange id"
    )
    snapshot: str | None = Field(
        None, description="Paper exchange only: the snapshot file, relative to the config file"
    )
    credentials_env: dict[CredentialField, EnvName] = Field(
        default_factory=dict,
        description="Names of environment variables holding credentials, by ccxt field (apiKey, secret); "
        "never the credentials themselves",
    )
    api_url: Annotated[str, AfterValidator(_api_url)] | None = Field(
        None, description="Replaces every REST base URL (a loopback emulator, a proxy); keeps the paths"
    )
    sandbox: bool = Field(False, description="Use the exchange's own testnet (ccxt sandbox mode)")
    options: dict[str, Any] = Field(default_factory=dict, description="Passed to the ccxt exchange's options")
    taker_fee: FeeRate | None = Field(
        None, description="Fallback taker fee when the account does not report one (fraction of notional)"
    )
    timeout: Duration = Field(Decimal(10), description="Timeout of one exchange request (e.g. 10s)")
    rate_limit_per_minute: Positive | None = Field(
        None,
        description="Request budget per minute in ccxt cost units (default: from ccxt's rateLimit); "
        "the tool uses 80% of it",
    )
    max_snapshot_skew: Duration = Field(
        Decimal(5), description="Refuse a snapshot whose parts were read further apart than this"
    )

    @property
    def is_paper(self) -> bool:
        return self.id == "paper"


class Config(BaseModel):
    """A portfolio: its targets, the policy that decides when trading is worth it, and where it trades."""

    model_config = ConfigDict(extra="forbid")
    portfolio_id: Annotated[str, AfterValidator(_portfolio_id)] = Field(
        description="Unique name of the portfolio; names its keys in the ledger and audit stores"
    )
    base_threshold: BaseThreshold = Field(
        description="Drift (fraction of portfolio value) below which an asset is never traded, 0.0001..0.1"
    )
    volatility_factor: VolatilityFactor = Field(
        description="Widens the threshold with volatility: base_threshold*(1 + factor*daily vol), 0.1..2"
    )
    safety_margin: SafetyMargin = Field(
        description="Trade only when the drift's value exceeds the estimated cost times this, 1.0..5.0"
    )
    max_trades_per_cycle: Annotated[int, BeforeValidator(_trade_count)] = Field(
        description="At most this many orders per cycle; the largest drift values win, 1..50"
    )
    assets: list[AssetConfig] = Field(min_length=1, description="Assets with target weights summing to 1")
    quote: Symbol | None = Field(
        None, description="Settlement currency; inferred when exactly one asset is a stable or fiat currency"
    )
    exchange: ExchangeConfig = Field(default_factory=lambda: ExchangeConfig(), description="Where the portfolio trades")
    hysteresis: Fraction = Field(
        Decimal(0),
        description="Trigger above threshold*(1+h); re-arm only below threshold*(1-h); 0..1 (0 disables)",
    )
    cooldown: Duration = Field(
        Decimal(0), description="After a trade an asset waits this long unless it breaches its hard band"
    )
    rebalance_to: RebalanceTo = Field(
        RebalanceTo.TARGET, description="`target`: trade back to target; `band_edge`: only to the band's edge"
    )
    policy: PolicyName = Field(
        PolicyName.NO_TRADE_REGION,
        description="`no-trade-region`: per-asset regions from costs, covariance and risk_aversion; "
        "`cost-adjusted`: the volatility-scaled threshold and cost gate of base_threshold/safety_margin",
    )
    risk_aversion: RiskAversion = Field(
        Decimal(5),
        description="Relative risk aversion gamma of the certainty-equivalent loss cost + gamma/2 * TE^2: sizes "
        "the no-trade regions and is the backtest's yardstick, 0.1..100",
    )
    region: RegionShape = Field(
        RegionShape.JOINT,
        description="no-trade-region: `joint` weighs each asset's deviation with the others' through the "
        "covariance (a hedged pair holds, an adding pair trades sooner); `per-asset` sizes each region alone",
    )
    region_point: Fraction = Field(
        Decimal("0.5"),
        description="no-trade-region: trade to this fraction of the region's half-width (1 = its edge, 0 = target); "
        "the region is sized for it (a point further inside waits for more drift before it trades)",
    )
    correlations: dict[str, Correlation] = Field(
        default_factory=dict,
        description="no-trade-region, when the snapshot carries no covariance: correlation of daily returns by "
        "pair, e.g. {BTC/ETH: 0.8}, with each market's volatility; unlisted pairs count as 0",
    )
    max_trade_notional: Positive | None = Field(
        None, description="Guard: refuse any single order above this quote value"
    )
    max_cycle_turnover: Positive | None = Field(
        None, description="Guard: refuse a cycle whose total traded quote value exceeds this"
    )
    max_slippage: Fraction | None = Field(
        None, description="Guard: refuse an order whose price is further than this fraction from mid"
    )
    max_plan_age: Duration = Field(
        Decimal(60), description="`execute --plan`: refuse a saved plan whose snapshot is older than this"
    )
    price_tolerance: Fraction = Field(
        Decimal("0.005"),
        description="`execute --plan`: refuse when a mid moved more than this fraction since planning",
    )
    interval: Duration = Field(Decimal(60), description="Daemon: seconds between cycles of this portfolio")
    redis_url: str | None = Field(None, description="Shadow ledger on Redis; default: embedded SQLite")
    database_url: str | None = Field(None, description="Audit trail on PostgreSQL; default: embedded SQLite")
    state_dir: str | None = Field(
        None,
        description="Embedded state directory; default $REBALANCE_STATE_DIR, else ~/.local/state/rebalance",
    )
    # set by the loader, never by the file: as a field, `source:` in a file would pass as a known key
    _source: str = PrivateAttr("")

    @property
    def source(self) -> str:
        """The file this config was loaded from; relative paths in it are relative to that file."""
        return self._source

    @property
    def quote_symbol(self) -> str:
        assert self.quote is not None  # the loader infers or demands it
        return self.quote

    def asset(self, symbol: str) -> AssetConfig | None:
        return next((a for a in self.assets if a.symbol == symbol), None)

    def resolved_state_dir(self) -> Path:
        return self._relative(self.state_dir) if self.state_dir else default_state_dir()

    def snapshot_path(self) -> Path | None:
        """The paper exchange's snapshot file; None for a real exchange."""
        if self.exchange.snapshot:
            return self._relative(self.exchange.snapshot)
        if self.exchange.is_paper:
            # a config without an `exchange` block is valid (the documented minimum) but has nothing to trade on
            raise ConfigError(
                [
                    Problem(
                        self._source or "config",
                        0,
                        0,
                        "exchange",
                        "no exchange configured: add `exchange: {id: paper, snapshot: FILE}` or a ccxt exchange id, "
                        "or plan from a saved snapshot with --snapshot FILE",
                    )
                ]
            )
        return None

    def _relative(self, value: str) -> Path:
        path = Path(value).expanduser()
        if not path.is_absolute() and self._source:
            path = Path(self._source).parent / path
        return path


def default_state_dir() -> Path:
    """$REBALANCE_STATE_DIR, else $XDG_STATE_HOME/rebalance, else ~/.local/state/rebalance."""
    env = os.environ.get("REBALANCE_STATE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_STATE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "state") / "rebalance"


def _cross_checks(doc: yamlfile.Located) -> list[Problem]:
    """Checks across keys, on the raw document so they run even when other keys are invalid."""
    data = doc.data
    problems: list[Problem] = []
    assets = data.get("assets")
    if not isinstance(assets, list):
        return problems
    seen: dict[str, int] = {}
    total = Decimal(0)
    weights_ok = True
    symbols: list[str] = []
    for i, item in enumerate(assets):
        if not isinstance(item, dict):
            continue
        sym = item.get("symbol")
        if isinstance(sym, str):
            symbols.append(sym)
            if sym in seen:
                problems.append(
                    doc.problem(("assets", i, "symbol"), f"duplicate symbol {sym} (also assets[{seen[sym]}])")
                )
            else:
                seen[sym] = i
        try:
            # the same parsing as the schema's: a quoted "0.4" or a 5e-1 (text in YAML 1.1) counts too
            total += to_decimal(item.get("target_weight"))
        except PydanticCustomError:
            weights_ok = False  # the schema reports the weight itself
    if weights_ok and assets and abs(total - 1) > WEIGHT_TOLERANCE:
        problems.append(
            doc.problem(("assets",), f"target weights sum to {total}, not 1 (tolerance {WEIGHT_TOLERANCE})")
        )
    quote = data.get("quote")
    if quote is None:
        stables = [s for s in symbols if s in STABLE_OR_FIAT]
        if len(stables) != 1 and symbols:
            which = (
                f"{len(stables)} assets are stable or fiat ({', '.join(stables)})"
                if stables
                else "no asset is a stable or fiat currency"
            )
            problems.append(
                doc.problem(
                    ("quote",),
                    f"required key is missing: {which}, so the quote currency cannot be inferred",
                    key=True,
                )
            )
    elif isinstance(quote, str) and symbols and quote not in symbols:
        problems.append(doc.problem(("quote",), f"quote {quote} must be one of the assets (it is the cash leg)"))
    correlations = data.get("correlations")
    if isinstance(correlations, dict):
        cash = {quote} if isinstance(quote, str) else set(STABLE_OR_FIAT)
        traded = set(symbols) - cash
        for pair in correlations:
            a, sep, b = str(pair).partition("/")
            if not sep or a == b or a not in traded or b not in traded:
                problems.append(
                    doc.problem(
                        ("correlations", pair),
                        f"'{pair}' must name two different traded assets as A/B (of {', '.join(sorted(traded))})",
                        key=True,
                    )
                )
    exchange = data.get("exchange")
    if isinstance(exchange, dict) and exchange.get("id", "paper") == "paper" and not exchange.get("snapshot"):
        problems.append(doc.problem(("exchange", "snapshot"), "the paper exchange needs a snapshot file", key=True))
    return problems


def load_config(path: Path) -> Config:
    """Load and validate a config file; raises `ConfigError` listing every problem with its line."""
    try:
        doc = yamlfile.load(path, kind="config", max_bytes=MAX_CONFIG_BYTES)
        doc.problems.extend(_cross_checks(doc))
        config = yamlfile.validate(Config, doc)
    except ConfigError:
        raise
    except InvalidFileError as exc:
        raise ConfigError(exc.problems) from None
    if config.quote is None:
        config.quote = next(a.symbol for a in config.assets if a.symbol in STABLE_OR_FIAT)
    config._source = str(path)
    return config


def json_schema() -> dict[str, Any]:
    schema = Config.model_json_schema(mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "rebalance portfolio config"
    return schema


# --- what `plan` would refuse before any request -------------------------------------------------------


def runnable_problems(config: Config) -> list[tuple[tuple[str | int, ...], str, bool]]:
    """What would stop `plan`/`execute` from running this config before any request, as (path, message,
    at the key); cheap (no file read unless a problem is found), so the daemon can check on every cycle."""
    from difflib import get_close_matches

    from .ccxt_ids import EXCHANGES

    found: list[tuple[tuple[str | int, ...], str, bool]] = []
    ex = config.exchange
    if "exchange" not in config.model_fields_set:
        found.append(
            (
                ("exchange",),
                "no exchange configured: add `exchange: {id: paper, snapshot: FILE}` or a ccxt exchange id "
                "(`plan --snapshot FILE` plans without one)",
                True,
            )
        )
    elif ex.is_paper:
        path = config.snapshot_path() if ex.snapshot else None
        if path is not None and not path.is_file():
            found.append((("exchange", "snapshot"), f"no such snapshot file: {path}", False))
    elif ex.id not in EXCHANGES:
        hint = get_close_matches(ex.id, ["paper", *EXCHANGES], n=1, cutoff=0.6)
        guess = f"; did you mean '{hint[0]}'?" if hint else " (`rebalance validate-config` lists none close)"
        found.append((("exchange", "id"), f"'{ex.id}' is neither `paper` nor an exchange ccxt knows{guess}", False))
    else:
        missing = [f for f in EXCHANGES[ex.id] if f not in ex.credentials_env]
        if missing:
            example = ", ".join(f"{f}: {ex.id.upper()}_{_snake(f).upper()}" for f in missing)
            found.append(
                (
                    ("exchange", "credentials_env"),
                    f"{ex.id} needs the credential(s) {', '.join(missing)}: name the environment variables "
                    f"holding them, e.g. credentials_env: {{{example}}}",
                    "credentials_env" not in ex.model_fields_set,
                )
            )
    return found


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)([A-Z])", r"_\1", name)


def _located(config: Config, found: list[tuple[tuple[str | int, ...], str, bool]]) -> list[Problem]:
    source = config.source or "config"
    try:
        doc = yamlfile.load(Path(source), kind="config", max_bytes=MAX_CONFIG_BYTES)
    except InvalidFileError:  # the file changed or went away since it was loaded: no lines, same messages
        return [Problem(source, 0, 0, yamlfile.render_path(p), m) for p, m, _ in found]
    return [doc.problem(p, m, key=key) for p, m, key in found]


def check_runnable(config: Config) -> None:
    """Raise `ConfigError`, located, when `plan` could not run this config (see `runnable_problems`)."""
    found = runnable_problems(config)
    if found:
        raise ConfigError(_located(config, found))


def check_config(path: Path) -> tuple[Config, list[str]]:
    """`rebalance validate-config`: the schema, and everything `plan` would check before its first request
    (exchange id, credentials named, files present); raises `ConfigError` with every problem at its line.
    Also returns notes: environment variables named for credentials but not set in this shell (a CI job
    validating configs has none; `plan` would stop there)."""
    config = load_config(path)
    check_runnable(config)
    notes = [
        f"credential {f}: environment variable {name} is not set here; plan and execute need it"
        for f, name in config.exchange.credentials_env.items()
        if not config.exchange.is_paper and not os.environ.get(name)
    ]
    return config, notes

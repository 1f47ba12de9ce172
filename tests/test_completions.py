"""Shell completions are generated from the CLI and asked for completions in the real shells: bash, zsh (an
interactive zsh on a pseudo-terminal, through compinit, as a user's TAB runs them) and fish."""

from __future__ import annotations

import os
import pty
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT

COMPLETIONS = ROOT / "completions"

# (words typed, then TAB) -> what must be offered, and what must not (the parent's options, option names
# where a value is expected)
CASES = [
    ("rebalance pl", {"plan"}, set()),
    ("rebalance db ", {"migrate"}, set()),
    ("rebalance backtest ", {"generate"}, set()),
    ("rebalance backtest generate --", {"--regime", "--steps", "--output"}, {"--compare", "--prices"}),
    ("rebalance backtest -p cost-adjusted-e", {"cost-adjusted-edge", "cost-adjusted-edge-half"}, {"--policy"}),
    ("rebalance daemon --log-format ", {"text", "json", "auto"}, {"--log-level"}),
    ("rebalance backtest generate --regime ", {"calm", "trending", "volatile"}, set()),
    ("rebalance validate-config ", {"portfolio.yaml", "prices.csv"}, {"-"}),
    ("rebalance plan -c port", {"portfolio.yaml"}, set()),
]


@pytest.fixture()
def cwd(tmp_path: Path) -> Path:
    for name in ("portfolio.yaml", "prices.csv"):
        (tmp_path / name).write_text("")
    return tmp_path


def _need(shell: str) -> None:
    if shutil.which(shell) is None:
        pytest.skip(f"{shell} is not installed here (Debian: apt-get install -y {shell})")


def _check(got: set[str], want: set[str], never: set[str], line: str) -> None:
    assert want <= got, f"{line!r}: offered {sorted(got)}"
    assert not (never & got), f"{line!r}: offered {sorted(never & got)}"


def test_completions_are_fresh() -> None:
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_completions.py"), "--check"], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr


def test_zsh_compdef_is_on_the_first_line() -> None:
    assert (COMPLETIONS / "_rebalance").read_text().startswith("#compdef rebalance\n")  # else compinit skips it


def test_bash(cwd: Path) -> None:
    _need("bash")
    script = COMPLETIONS / "rebalance.bash"
    for line, want, never in CASES:
        words = line.split(" ")  # a trailing space: the word being completed is empty
        quoted = " ".join(f"'{w}'" for w in words)
        probe = f"source {script}; COMP_WORDS=({quoted}); COMP_CWORD={len(words) - 1}; _rebalance; "
        probe += 'printf "%s\\n" "${COMPREPLY[@]}"'
        out = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, cwd=cwd, check=True).stdout
        _check(set(out.split()), want, never, line)


def test_fish(cwd: Path) -> None:
    _need("fish")
    script = COMPLETIONS / "rebalance.fish"
    for line, want, never in CASES:
        probe = f"source {script}; complete -C '{line}'"
        out = subprocess.run(["fish", "-c", probe], capture_output=True, text=True, cwd=cwd, check=True).stdout
        _check({row.split("\t")[0] for row in out.splitlines()}, want, never, line)


ZSH_SETUP = r"""
PS1='' PROMPT='' RPROMPT=''
fpath=({dir} $fpath)
autoload -U compinit && compinit -u -D
zstyle ':completion:*' list-grouped false
zstyle ':completion:*' insert-tab false
compadd () {{
  if [[ ${{@[1,-1]}} =~ '(^| )-(O|A|D) ' ]]; then builtin compadd "$@"; return $?; fi
  typeset -a __hits
  builtin compadd -A __hits "$@"
  local h; for h in $__hits; do print -r -- "<HIT>$h"; done
  builtin compadd "$@"
}}
__rb_done () {{ print -r -- '<DONE>'; exit }}
comppostfuncs=( __rb_done )
bindkey '^I' complete-word
print -r -- '<READY>'
"""


def _zsh_complete(line: str, cwd: Path) -> set[str]:
    """TAB in an interactive zsh with this completion on $fpath; what it offered (compadd's matches)."""
    master, slave = pty.openpty()
    env = {**os.environ, "TERM": "dumb", "HOME": str(cwd)}
    proc = subprocess.Popen(["zsh", "-f", "-i"], stdin=slave, stdout=slave, stderr=slave, cwd=cwd, env=env)
    os.close(slave)
    buf = b""

    def read_until(marker: bytes) -> None:
        nonlocal buf
        deadline = time.monotonic() + 30  # a hung shell fails the test instead of hanging it
        while marker not in buf and time.monotonic() < deadline:
            if select.select([master], [], [], 0.2)[0]:
                try:
                    buf += os.read(master, 65536)
                except OSError:
                    break
        assert marker in buf, buf.decode(errors="replace")

    try:
        os.write(master, ZSH_SETUP.format(dir=COMPLETIONS).encode())
        read_until(b"<READY>\r\n")
        buf = b""
        os.write(master, (line + "\t").encode())
        read_until(b"<DONE>")
    finally:
        proc.kill()  # by pid: the shell this test started
        proc.wait()
        os.close(master)
    text = buf.decode(errors="replace")
    return {row.split("<HIT>", 1)[1].strip() for row in text.splitlines() if "<HIT>" in row}


@pytest.mark.slow
def test_zsh(cwd: Path) -> None:
    _need("zsh")
    for line, want, never in CASES:
        _check(_zsh_complete(line, cwd), want, never, line)

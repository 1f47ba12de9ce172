"""Shell completions are generated from the CLI; stale ones would complete flags that no longer exist."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT


def test_completions_are_fresh() -> None:
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_completions.py"), "--check"], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr


def test_bash_completion_completes_commands_and_flags() -> None:
    script = ROOT / "completions" / "rebalance.bash"
    probe = (
        f'source {script}; COMP_WORDS=(rebalance pl); COMP_CWORD=1; _rebalance; echo "${{COMPREPLY[@]}}"; '
        'COMP_WORDS=(rebalance plan --sn); COMP_CWORD=2; _rebalance; echo "${COMPREPLY[@]}"'
    )
    out = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out == ["plan", "--snapshot"]

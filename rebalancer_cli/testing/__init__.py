"""Test infrastructure shipped with the package: the loopback Binance spot exchange emulator.

It lives in the package (not under tests/) so that subprocess tests, benchmarks and operators trying the
tool without an exchange account can all run `python -m rebalancer_cli.testing.emulator`.
"""

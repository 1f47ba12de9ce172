-- Holdings of one asset minus its live locks (read only). KEYS: hold, locks. ARGV: asset.
return available(KEYS[1], KEYS[2], ARGV[1], now_ms(), false)

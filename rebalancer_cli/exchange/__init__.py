"""The exchange boundary: protocol, implementations, rate limiting, retries and the circuit breaker."""

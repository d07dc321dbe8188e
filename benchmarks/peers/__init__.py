"""Peer stores the benchmark measures memkv against (Redis, Mooncake Store); see each module."""

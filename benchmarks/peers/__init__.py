"""Peer stores the benchmark measures memkv against (Redis, Mooncake Store); see each module."""
from .mooncake_peer import MooncakePeer
from .redis_peer import RedisPeer

PEERS = [RedisPeer, MooncakePeer]

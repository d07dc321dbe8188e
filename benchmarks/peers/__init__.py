"""Peer stores the benchmark measures memkv against (Redis over TCP and over a unix socket, Mooncake Store); see each module."""
from .mooncake_peer import MooncakePeer
from .redis_peer import RedisPeer, RedisUnixPeer

PEERS = [RedisPeer, RedisUnixPeer, MooncakePeer]

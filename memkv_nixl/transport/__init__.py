"""Data-path providers: tcp everywhere; cma (same host, via the unix socket) where the server
may reach the client's memory. Both run in C (memkv_nixl/_native); rdma is not built yet."""

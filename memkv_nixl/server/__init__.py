"""memkv server package: the block store, its configuration and the TCP server."""

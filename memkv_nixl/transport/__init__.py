"""Data-path providers. tcp: everywhere (the only one implemented so far)."""

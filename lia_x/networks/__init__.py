"""LIA-X networks: `from lia_x.networks.generator import Generator`."""

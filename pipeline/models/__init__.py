"""Backbones (registered with timm), heads and the Network that pairs them."""

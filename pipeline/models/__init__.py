"""Backbones (CIFAR ResNets in plain PyTorch, the rest through timm), heads and the Network that pairs them."""

"""Command-line tools: `python -m resnet_fused demo | profile | report` (see resnet_fused/__main__.py)."""

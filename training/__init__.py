"""One training loop for every network: backbones by timm name, weight sources, losses, checkpoints."""

"""What the notebooks of one experiment share, one module per experiment: `sentiment`, `toxicity`, `suite`."""

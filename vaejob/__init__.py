"""vaejob: distributed, preemption-proof VAE training on WebDataset shards."""

__version__ = "0.1.0"

"""vaedraw: teach a variational autoencoder to draw handwritten digits, then draw new ones."""

__version__ = "0.1.0"

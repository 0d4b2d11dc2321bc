"""srmil: a whole-slide-image pipeline from slides to trained SRMIL and ABMIL models."""

__version__ = "0.1.0"

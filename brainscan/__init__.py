"""brainscan: batch scoring of brain MRI scans. Shared core for the API, the workers and training."""

CLASSES: tuple[str, ...] = ("glioma", "meningioma", "notumor", "pituitary")
"""The model's output order. Every model served must emit probabilities in this order."""

__version__ = "0.1.0"

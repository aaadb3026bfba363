"""Datasets used by modelfold's experiments."""

from modelfold.data.fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist

__all__ = ["FASHION_MNIST_CLASSES", "load_fashion_mnist"]

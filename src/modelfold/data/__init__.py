"""Datasets used by modelfold's experiments, and loaders for users' own CIFAR-10 / ImageNet."""

from modelfold.data.fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist
from modelfold.data.images import CIFAR10_CLASSES, ImageFolder, load_cifar10
from modelfold.data.samples import load_foolbox_cifar10, load_foolbox_imagenet

__all__ = ["CIFAR10_CLASSES", "FASHION_MNIST_CLASSES", "ImageFolder", "load_cifar10",
           "load_fashion_mnist", "load_foolbox_cifar10", "load_foolbox_imagenet"]

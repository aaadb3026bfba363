"""Loaders for users' own CIFAR-10 / ImageNet images and the sample images of wheels (PIL, from
the `data` extra, is imported only when images are decoded). The Fashion-MNIST loader of the demo
lives in the source checkout's `experiments/fashion_mnist.py`."""

from modelfold.data.images import CIFAR10_CLASSES, ImageFolder, load_cifar10
from modelfold.data.samples import load_foolbox_cifar10, load_foolbox_imagenet

__all__ = ["CIFAR10_CLASSES", "ImageFolder", "load_cifar10", "load_foolbox_cifar10",
           "load_foolbox_imagenet"]

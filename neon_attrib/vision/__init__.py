"""Vision utilities: preprocessing and input bounds, backbones and their weights, image files.

========================  ======================================================================
module                    contents
========================  ======================================================================
``vision.preprocessing``  :class:`Preprocessing`, :data:`PREPROCESSINGS`, :func:`get_preprocessing`
``vision.backbones``      :func:`vgg16_features`, :func:`weights_preprocessing`
``vision.images``         :func:`load_image`, :func:`check_image_size`
========================  ======================================================================
"""

from .backbones import vgg16_features, weights_preprocessing
from .images import IMAGE_SUFFIXES, VGG16_MIN_SIZE, check_image_size, load_image
from .preprocessing import PREPROCESSINGS, Preprocessing, check_rgb, get_preprocessing

__all__ = [
    "Preprocessing",
    "PREPROCESSINGS",
    "get_preprocessing",
    "check_rgb",
    "vgg16_features",
    "weights_preprocessing",
    "load_image",
    "check_image_size",
    "VGG16_MIN_SIZE",
    "IMAGE_SUFFIXES",
]

"""Vision utilities: preprocessing and input bounds, backbones and their weights, image files.

========================  ======================================================================
module                    contents
========================  ======================================================================
``vision.preprocessing``  :class:`Preprocessing`, :data:`PREPROCESSINGS`, :func:`get_preprocessing`
``vision.backbones``      :func:`backbone`, :data:`BACKBONES`, :func:`default_canonizers`, :class:`CifarResNet`,
                          :func:`vgg16_features`, :func:`weights_preprocessing`
``vision.taps``           :class:`FeatureTaps` (multi-layer features), :class:`BilinearResize`, :class:`ChannelPool`
``vision.images``         :func:`load_image`, :func:`check_image_size`
========================  ======================================================================
"""

from .backbones import (
    BACKBONES,
    CifarBasicBlock,
    CifarResNet,
    ShortcutA,
    backbone,
    default_canonizers,
    vgg16_features,
    weights_preprocessing,
)
from .images import (
    IMAGE_SUFFIXES,
    VGG16_MIN_SIZE,
    ConstantImageError,
    check_image_size,
    check_not_constant,
    image_files,
    load_image,
)
from .preprocessing import PREPROCESSINGS, Preprocessing, check_rgb, get_preprocessing
from .taps import BilinearResize, ChannelPool, FeatureTaps

__all__ = [
    "Preprocessing",
    "PREPROCESSINGS",
    "get_preprocessing",
    "check_rgb",
    "backbone",
    "BACKBONES",
    "default_canonizers",
    "CifarResNet",
    "CifarBasicBlock",
    "ShortcutA",
    "vgg16_features",
    "weights_preprocessing",
    "FeatureTaps",
    "BilinearResize",
    "ChannelPool",
    "load_image",
    "check_image_size",
    "image_files",
    "check_not_constant",
    "ConstantImageError",
    "VGG16_MIN_SIZE",
    "IMAGE_SUFFIXES",
]

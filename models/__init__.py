"""Model registry: one builder per architecture family.

    >>> from models import build_model, list_models
    >>> model = build_model("resnet", "cifar10", layers=20)

Each family registers a builder ``fn(family, layers, width_mult, bn, num_classes)``
where ``family`` is ``"cifar"`` (32x32 inputs) or ``"imagenet"`` (224x224). A family whose
published weights expect inputs normalised otherwise than with the data set's own statistics
declares them (``input_stats``); data.py reads them from here.
"""
from .registry import (  # noqa: F401  (the package's public names)
    DATASET_FAMILY,
    ModelError,
    build_model,
    dataset_family,
    default_depth,
    has_variant,
    input_stats,
    list_models,
    model_name,
    register_model,
    scaled,
    supported_depths,
    uses_bn_flag,
    uses_depth,
)

# Import the families so that they register themselves.
from . import mobilenet, mobilenetv2, resnet, vgg, wideresnet  # noqa: E402,F401  isort: skip

"""Deprecated alias of :mod:`cachecard.transforms.pruning` (pruning is a transform, not a codec); removed in
0.3."""

import warnings

from cachecard.transforms.pruning import *  # noqa: F401,F403
from cachecard.transforms.pruning import __all__  # noqa: F401

warnings.warn("cachecard.codecs.pruning moved to cachecard.transforms.pruning (or cachecard.prune); the old "
              "name goes away in 0.3", DeprecationWarning, stacklevel=2)

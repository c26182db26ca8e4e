"""What changes KV before it is stored, irreversibly (not a codec): token pruning."""

from cachecard.transforms.pruning import prune

__all__ = ["prune"]

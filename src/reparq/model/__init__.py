"""Model transforms that do not quantize: branch merging and BN folding."""

from reparq.model.fold import fold_batchnorm, fuse_conv_bn
from reparq.model.merge import list_mergers, merge_branches, register_merger

__all__ = ["fold_batchnorm", "fuse_conv_bn", "list_mergers", "merge_branches", "register_merger"]

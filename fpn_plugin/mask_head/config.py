"""Config keys of fpn_plugin.mask_head (filled in by its issue)."""


def add_mask_head_config(cfg):
    """Add fpn_plugin.mask_head's keys to ``cfg`` (in place)."""

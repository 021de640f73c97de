"""Config keys of fpn_plugin.rpn (filled in by its issue)."""


def add_rpn_config(cfg):
    """Add fpn_plugin.rpn's keys to ``cfg`` (in place)."""

"""Config keys of fpn_plugin.data (filled in by its issue)."""


def add_data_config(cfg):
    """Add fpn_plugin.data's keys to ``cfg`` (in place)."""

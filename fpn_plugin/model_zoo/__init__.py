"""
The plugin's configs by name, as Detectron2's ``detectron2.model_zoo`` serves its own:

    from fpn_plugin import model_zoo

    model_zoo.get_config_file("COCO-InstanceSegmentation/mask_rcnn_R_50_custom_fpn_1x.yaml")
    cfg = model_zoo.get_config("new_baselines/mask_rcnn_R_50_custom_FPN_100ep_LSJ.py")
    model = model_zoo.get("Demo/mask_rcnn_R_18_custom_fpn_shapes.yaml", device="cpu")

The names are paths under the repository's ``configs/`` folder, which the wheel ships as
package data (``fpn_plugin/model_zoo/configs``). No trained weights exist for these configs:
:func:`get` returns a freshly initialized model.
"""
from .model_zoo import (
    config_root,
    get,
    get_config,
    get_config_file,
    get_detectron2_config,
    get_detectron2_config_file,
    list_configs,
)

__all__ = ["config_root", "get", "get_config", "get_config_file", "get_detectron2_config",
           "get_detectron2_config_file", "list_configs"]

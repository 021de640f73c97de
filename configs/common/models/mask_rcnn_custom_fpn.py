# Mask R-CNN R50-FPN from fpn_plugin's components: the twin of Detectron2's
# common/models/mask_rcnn_fpn.py. Detectron2's model tree is read from its model zoo (not
# copied); fpn_plugin.lazy_config.with_plugin_components puts the plugin's neck (CustomFPN),
# per-level RPN (PerLevelRPN + PerLevelRPNHead) and mask head (ConvUpsampleMaskHead) in place
# of Detectron2's, keeping every argument and writing the plugin's options out at the values
# that reproduce Detectron2 (same modules, parameter names and outputs), e.g.
#   model.backbone.fuse_type = "weighted"            # fast normalized fusion
#   model.proposal_generator.head.shared = False     # an RPN head per level
# Use it like Detectron2's: `from ..common.models.mask_rcnn_custom_fpn import model`.
# get_detectron2_config reads Detectron2's file as detectron2.model_zoo.get_config does, without
# importing detectron2.model_zoo (v0.6's needs pkg_resources, gone from setuptools >= 81).
from fpn_plugin.lazy_config import with_plugin_components
from fpn_plugin.model_zoo import get_detectron2_config

_detectron2 = get_detectron2_config("common/models/mask_rcnn_fpn.py")
model = with_plugin_components(_detectron2.model)
# Detectron2 main's file also defines the pixel statistics it reads (common/data/constants.py).
if "constants" in _detectron2:
    constants = _detectron2.constants

# Detectron2's new baseline mask_rcnn_R_50_FPN_200ep_LSJ (large-scale jitter, SyncBN,
# 4conv1fc box head, 2-conv RPN head, from scratch) with fpn_plugin's neck, per-level RPN and
# mask head. Data, optimizer, schedule and train settings are Detectron2's recipe, read from its
# model zoo (not copied); the model is the same (tests/lazy/test_parity.py).
from fpn_plugin.lazy_config import model_zoo_recipe

_recipe = model_zoo_recipe("new_baselines/mask_rcnn_R_50_FPN_200ep_LSJ.py")
dataloader = _recipe.dataloader
lr_multiplier = _recipe.lr_multiplier
model = _recipe.model
optimizer = _recipe.optimizer
train = _recipe.train

"""
Every LazyConfig file under configs/: saves as plain YAML that loads back to the same config,
instantiates (from the re-loaded config) to a model of the plugin's components and trains one
step at cheap sizes (ResNet-18, 32-channel pyramid, 64 px images: the architecture's layout,
norms and options stay the config's; full-size models are compared in test_parity.py). The
twins change nothing of Detectron2's recipe but the components; the variants change only
their option; the LazyConfig demo is the YAML demo.
"""
import os

import pytest
import torch
import yaml
from fpn_plugin.model_zoo import get_detectron2_config
from detectron2.config import LazyConfig, instantiate
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from lazy_testutils import (
    CONFIGS,
    DEMO_LAZY,
    ROOT,
    VARIANTS,
    ZOO_TWINS,
    differing_paths,
    load,
    plain,
    settings,
    shrink,
    tiny_batch,
)

import fpn_plugin  # noqa: F401  (registers the components)
from fpn_plugin.lazy_config import plain_data

# What a twin's model may differ in from Detectron2's: the component classes and the
# plugin's options, written out at their parity values (fpn_plugin.lazy_config).
TWIN_MODEL_CHANGES = {
    "backbone._target_", "backbone.fuse_type", "backbone.upsample_mode",
    "backbone.weighted_fusion_eps",
    "proposal_generator._target_", "proposal_generator.post_nms_topk_per_level",
    "proposal_generator.head._target_", "proposal_generator.head.shared",
    "proposal_generator.head.norm",
    "roi_heads.mask_head._target_", "roi_heads.mask_head.upsample_mode",
}
# What each variant changes in the R50 100ep twin (only that).
VARIANT_CHANGES = {
    "panet": {"model.backbone._target_"},
    "weighted_fusion": {"model.backbone.fuse_type"},
    "bilinear": {"model.backbone.upsample_mode"},
    "unshared_rpn": {"model.proposal_generator.head.shared",
                     "model.proposal_generator.head.num_levels"},
    "per_level_anchors": {"model.proposal_generator.anchor_generator.aspect_ratios",
                          "model.proposal_generator.head.num_anchors"},
    "per_level_topk": {"model.proposal_generator.pre_nms_topk",
                       "model.proposal_generator.post_nms_topk",
                       "model.proposal_generator.post_nms_topk_per_level"},
    "panet_mask": {"model.roi_heads.mask_head", "model.roi_heads.mask_pooler"},
    "bifpn": {"model.backbone._target_", "model.backbone.fuse_type", "model.backbone.num_cells"},
    "mask_scoring": {"model.roi_heads.mask_head._target_"},
}
TWIN_100EP = {50: "new_baselines/mask_rcnn_R_50_custom_FPN_100ep_LSJ.py",
              101: "new_baselines/mask_rcnn_R_101_custom_FPN_100ep_LSJ.py"}


def test_every_lazy_config_is_tested():
    assert set(ZOO_TWINS) <= set(CONFIGS)
    assert {v.split("custom_FPN_")[1].replace("_100ep_LSJ.py", "") for v in VARIANTS} \
        == set(VARIANT_CHANGES)
    assert DEMO_LAZY in CONFIGS
    assert set(CONFIGS) == set(ZOO_TWINS) | set(VARIANTS) | {DEMO_LAZY}


@pytest.mark.parametrize("rel_path", CONFIGS)
def test_config_round_trips_builds_plugin_model_and_trains_one_step(rel_path, tmp_path):
    cfg = load(rel_path)
    saved = tmp_path / "config.yaml"
    LazyConfig.save(cfg, str(saved))
    # Plain YAML: no pickle fallback, no Python tags (safe_load would refuse them).
    assert sorted(os.listdir(tmp_path)) == ["config.yaml"]
    yaml.safe_load(saved.read_text())
    back = LazyConfig.load(str(saved))
    assert plain(back) == plain(cfg)

    # The re-loaded config builds the model (what a saved run restarts from).
    model_cfg = shrink(back.model)
    torch.manual_seed(0)
    model = instantiate(model_cfg).train()
    for part in (model.backbone, model.proposal_generator, model.proposal_generator.rpn_head,
                 model.roi_heads.mask_head):
        assert type(part).__module__.startswith("fpn_plugin."), (rel_path, type(part))
    if "optimizer" in back:  # a recipe (the common model file defines the model only)
        back.optimizer.params.model = model
        optimizer = instantiate(back.optimizer)
        instantiate(back.lr_multiplier)
        # The recipe's data pipeline builds too (the datasets themselves are not read here).
        instantiate(back.dataloader.train.mapper)
        assert back.dataloader.evaluator._target_.endswith("COCOEvaluator")
    else:
        assert set(back) <= {"model", "constants"}, rel_path  # constants: Detectron2 main
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    with EventStorage(0):
        losses = model(tiny_batch())
    assert {"loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_mask"} \
        <= set(losses)
    total = sum(losses.values())
    assert torch.isfinite(total)
    optimizer.zero_grad()
    total.backward()
    optimizer.step()
    changed = {n.split(".")[0] + "." + n.split(".")[1] for n, p in model.named_parameters()
               if p.requires_grad and not torch.equal(p.detach(), before[n])}
    assert {"backbone.bottom_up", "proposal_generator.rpn_head", "roi_heads.box_head",
            "roi_heads.mask_head"} <= changed


def _load_config_without_models(path):
    """(model-zoo config path) -> its config, norms/ShapeSpecs as plain data."""
    cfg = get_detectron2_config(path)
    plain_data(cfg.model)
    return cfg


@pytest.mark.parametrize("rel_path", sorted(ZOO_TWINS))
def test_twin_is_detectron2_recipe_with_only_the_components_swapped(rel_path):
    ours = load(rel_path)
    theirs = _load_config_without_models(ZOO_TWINS[rel_path])
    assert set(ours) == set(theirs)
    for key in theirs:
        if key != "model":  # data, optimizer, schedule, train: Detectron2's, untouched
            assert plain(ours[key]) == plain(theirs[key]), key
    changed = set(differing_paths(plain(ours.model), plain(theirs.model)))
    assert changed == TWIN_MODEL_CHANGES


@pytest.mark.parametrize("rel_path", sorted(r for r in ZOO_TWINS if "_LSJ" in r))
def test_every_schedule_has_the_100ep_model(rel_path):
    """The 50/200/400ep twins differ from the 100ep one in the schedule only (so the full
    models compared in test_parity.py cover them), as Detectron2's own recipes do."""
    depth = 101 if "_R_101_" in rel_path else 50
    ours, base = load(rel_path), load(TWIN_100EP[depth])
    assert plain(ours.model) == plain(base.model)
    assert plain(ours.dataloader) == plain(base.dataloader)
    theirs = _load_config_without_models(ZOO_TWINS[rel_path])
    theirs_base = _load_config_without_models(ZOO_TWINS[TWIN_100EP[depth]])
    assert plain(theirs.model) == plain(theirs_base.model)


@pytest.mark.parametrize("rel_path", VARIANTS)
def test_variant_changes_only_its_option(rel_path):
    name = rel_path.split("custom_FPN_")[1].replace("_100ep_LSJ.py", "")
    twin = plain(load(TWIN_100EP[50]))
    ours = plain(load(rel_path))
    changed = {p for p in differing_paths(ours, twin)}
    expected = VARIANT_CHANGES[name]
    assert {p for p in changed if not any(p.startswith(e) for e in expected)} == set()
    assert all(any(p.startswith(e) for p in changed) for e in expected)


def _groups(optimizer, model):
    """Each parameter's (name, lr, weight decay, betas), whatever the group order."""
    names = {id(p): n for n, p in model.named_parameters()}
    return sorted((names[id(p)], g["lr"], g["weight_decay"], g.get("betas"))
                  for g in optimizer.param_groups for p in g["params"])


def _effective(module_settings):
    """Settings as they act: FastRCNNOutputLayers weighs a loss missing from ``loss_weight``
    by 1.0 (its from_config lists only loss_box_reg; its constructor's float default, which a
    LazyConfig keeps, lists both)."""
    weights = module_settings.get("loss_weight")
    if isinstance(weights, dict):
        module_settings = dict(module_settings, loss_weight={
            k: weights.get(k, 1.0) for k in ("loss_cls", "loss_box_reg", *weights)})
    return module_settings


def _augmentations(mapper):
    """Each augmentation's class and settings, sequences as lists (a LazyConfig hands a tuple
    over as a ListConfig; both act the same)."""
    from omegaconf import ListConfig

    def as_data(value):
        return [as_data(v) for v in value] if isinstance(value, (tuple, list, ListConfig)) \
            else value

    return [(type(a), {k: as_data(v) for k, v in sorted(vars(a).items())})
            for a in mapper.augmentations.augs]


def test_lazy_demo_is_the_yaml_demo():
    """Same modules and initial weights from the same seed, same optimizer groups and
    learning-rate schedule, same data pipeline and run settings as the YAML demo."""
    from detectron2.data import DatasetMapper
    from detectron2.solver import build_lr_scheduler

    from fpn_plugin.config import load_config
    from fpn_plugin.engine.trainer import build_optimizer_for

    yaml_cfg = load_config(os.path.join(ROOT, "configs", "Demo",
                                        "mask_rcnn_R_18_custom_fpn_shapes.yaml"))
    lazy = load(DEMO_LAZY)
    torch.manual_seed(0)
    expected = build_model(yaml_cfg)
    torch.manual_seed(0)
    model = instantiate(lazy.model)
    assert [(n, type(m)) for n, m in model.named_modules()] == \
        [(n, type(m)) for n, m in expected.named_modules()]
    ours, theirs = model.state_dict(), expected.state_dict()
    assert ours.keys() == theirs.keys()
    for k in theirs:
        assert torch.equal(ours[k], theirs[k]), k
    for (name, a), b in zip(model.named_modules(), expected.modules()):
        assert a.extra_repr() == b.extra_repr(), name
        assert _effective(settings(a)) == _effective(settings(b)), name

    lazy.optimizer.params.model = model
    optimizer, expected_optimizer = instantiate(lazy.optimizer), build_optimizer_for(
        yaml_cfg, expected)
    assert type(optimizer) is type(expected_optimizer)
    assert _groups(optimizer, model) == _groups(expected_optimizer, expected)
    multiplier = instantiate(lazy.lr_multiplier)
    scheduler = build_lr_scheduler(yaml_cfg, expected_optimizer)
    expected_lrs = []
    for _ in range(yaml_cfg.SOLVER.MAX_ITER):
        expected_lrs.append(expected_optimizer.param_groups[0]["lr"])
        scheduler.step()
    max_iter = lazy.train.max_iter
    assert max_iter == yaml_cfg.SOLVER.MAX_ITER
    lrs = [lazy.optimizer.lr * multiplier(i / max_iter) for i in range(max_iter)]
    assert lrs == pytest.approx(expected_lrs, rel=1e-9)

    for is_train, name in ((True, "train"), (False, "test")):
        mapper = instantiate(lazy.dataloader[name].mapper)
        expected_mapper = DatasetMapper(yaml_cfg, is_train)
        assert _augmentations(mapper) == _augmentations(expected_mapper)
        assert mapper.image_format == expected_mapper.image_format
        assert mapper.is_train == is_train
        if is_train:  # a test-time mapper drops the annotations, so these do not act there
            assert (mapper.use_instance_mask, mapper.recompute_boxes) == (
                expected_mapper.use_instance_mask, expected_mapper.recompute_boxes)
    assert lazy.dataloader.train.total_batch_size == yaml_cfg.SOLVER.IMS_PER_BATCH
    assert lazy.dataloader.train.dataset.names == yaml_cfg.DATASETS.TRAIN[0]
    assert lazy.dataloader.test.dataset.names == yaml_cfg.DATASETS.TEST[0]
    shapes = yaml_cfg.DATASETS.SHAPES
    assert dict(lazy.dataloader.shapes) == dict(
        root=shapes.ROOT, num_train=shapes.NUM_TRAIN, num_val=shapes.NUM_VAL,
        image_size=shapes.IMAGE_SIZE, seed=shapes.SEED)
    assert (lazy.train.eval_period, lazy.train.checkpointer.period, lazy.train.seed,
            lazy.train.device) == (yaml_cfg.TEST.EVAL_PERIOD, yaml_cfg.SOLVER.CHECKPOINT_PERIOD,
                                   yaml_cfg.SEED, yaml_cfg.MODEL.DEVICE)

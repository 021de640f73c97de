"""
Fuzzing the LazyConfig YAML boundary: generated nested configs whose _target_s are drawn from
allowed, refused and odd values. The check refuses exactly the files with a target outside the
allow-list (naming the file and that target's key path) and passes the others; nothing else
is raised.
"""
from fuzz_testutils import FUZZ
from hypothesis import given
from hypothesis import strategies as st

import yaml
from fpn_plugin.io import ConfigFileError, LazyTargetError, check_lazy_yaml

ALLOWED = ["detectron2.modeling.GeneralizedRCNN", "fpn_plugin.neck.CustomFPN", "torch.nn.ReLU",
           "torchvision.ops.nms", "fvcore.common.param_scheduler.CosineParamScheduler",
           "mypkg.Net"]
REFUSED = ["subprocess.call", "os.system", "builtins.eval", "torch.hub.load", "torchx.evil",
           "detectron2x.y", "", 3, None]
NODES = st.recursive(
    st.one_of(st.integers(), st.text(max_size=4)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.fixed_dictionaries({"_target_": st.sampled_from(ALLOWED + REFUSED)},
                              optional={"a": inner, "b": inner}),
        st.dictionaries(st.sampled_from(["x", "y", "model"]), inner, max_size=2)),
    max_leaves=8)


def _targets(node, path=""):
    if isinstance(node, dict):
        for k, v in node.items():
            key = f"{path}.{k}" if path else k
            yield from ([(key, v)] if k == "_target_" else _targets(v, key))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _targets(v, f"{path}[{i}]")


@FUZZ
@given(st.dictionaries(st.sampled_from(["model", "train", "dataloader"]), NODES, min_size=1,
                       max_size=3))
def test_exactly_the_files_with_a_target_outside_the_allow_list_are_refused(tmp_path_factory,
                                                                             data):
    path = tmp_path_factory.mktemp("lazy") / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    bad = [(k, t) for k, t in _targets(data) if t not in ALLOWED]
    try:
        check_lazy_yaml(str(path), ["mypkg"])
    except LazyTargetError as e:
        assert bad and "c.yaml" in str(e)
        assert any(k in str(e) for k, _ in bad), (str(e), bad)
        return
    except ConfigFileError as e:  # e.g. the file is not a mapping
        assert "c.yaml" in str(e)
        return
    assert not bad

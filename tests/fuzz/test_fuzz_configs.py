"""
Fuzzing the config reading boundary: generated YAML configs (plugin keys with values of any
type, Python tags anywhere, _BASE_ chains over local files, addresses and cycles, nesting)
either load, or fail with a ValueError / FileNotFoundError naming the file; a tag never runs
its command, and nothing else is raised (no traceback reaches the entries).
"""
import os

import yaml
from fuzz_testutils import FUZZ
from hypothesis import given
from hypothesis import strategies as st

from fpn_plugin.config import load_config

KEYS = ["MODEL.FPN.FUSE_TYPE", "MODEL.FPN.OUT_CHANNELS", "SOLVER.MAX_ITER", "SOLVER.BASE_LR",
        "INPUT.MIN_SIZE_TRAIN", "MODEL.ROI_HEADS.NUM_CLASSES", "DATASETS.TRAIN", "NOT.A_KEY",
        "MODEL", "SOLVER.AMP.ENABLED"]
VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-3, 300), st.floats(allow_nan=True),
              st.text(max_size=6), st.just("sum")),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.sampled_from(["A", "B", "FUSE_TYPE"]), inner,
                                            max_size=2)),
    max_leaves=6)
TAG = "!!python/object/apply:os.system ['touch {marker}']"


def _nest(flat):
    out = {}
    for key, value in flat.items():
        node = out
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {}) if isinstance(node.get(p, {}), dict) else {}
        node[last] = value
    return out


@st.composite
def config_trees(draw):
    n = draw(st.integers(1, 3))
    files = []
    for i in range(n):
        body = _nest(draw(st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=3)))
        base = draw(st.one_of(st.none(), st.integers(0, n - 1).map(lambda j: f"f{j}.yaml"),
                              st.sampled_from(["http://127.0.0.1:9/b.yaml", "missing.yaml",
                                               "/nonexistent/b.yaml", "model_zoo://x.yaml"])))
        files.append((body, base, draw(st.booleans()) and draw(st.booleans())))
    return files


@FUZZ
@given(config_trees())
def test_configs_load_or_fail_naming_the_file_and_tags_never_run(tmp_path_factory, files):
    folder = tmp_path_factory.mktemp("cfg")
    marker = folder / "ran"
    for i, (body, base, tagged) in enumerate(files):
        text = yaml.safe_dump(body) if body else ""
        if base:
            text = f"_BASE_: {base}\n" + text
        if tagged:
            text += f"TAGGED: {TAG.format(marker=marker)}\n"
        (folder / f"f{i}.yaml").write_text(text)
    try:
        load_config(str(folder / "f0.yaml"))
    except (ValueError, FileNotFoundError) as e:
        assert ".yaml" in str(e), str(e)
    assert not marker.exists()
    assert sorted(os.listdir(folder)) == [f"f{i}.yaml" for i in range(len(files))]

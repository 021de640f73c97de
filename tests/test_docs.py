"""
The documentation runs as shown, and its claims point at tests that exist.

- Every ``python`` snippet in README.md and docs/*.md runs, in this process, from the
  repository root, on CPU; every ``bash`` snippet runs too, unless the line before it is a
  marker ``<!-- snippet: skip: <why> -->`` (a command that needs GPUs, COCO, a trained model or
  hours). Markers must sit right before a snippet and give a reason; test node ids they name
  must exist (a parametrized test may be named without its parameters).
- docs/reliability.md lists at least 80 bad inputs and faults, each mapped to test node ids
  that exist (checked against this session's collected tests, or by collecting them).
"""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md"] + sorted(os.path.join("docs", f)
                              for f in os.listdir(os.path.join(ROOT, "docs")) if f.endswith(".md"))
_FENCE = re.compile(r"^```(\S*)\s*$")
_SKIP = re.compile(r"^<!--\s*snippet:\s*skip:\s*(.*?)\s*-->\s*$")
_NODE_ID = re.compile(r"`(tests/[\w/]+\.py::\w+(?:\[[^`]*\])?)`")


def _snippets():
    """(file, line, language, code, skip reason or None) of every fenced block."""
    found = []
    for doc in DOCS:
        with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
            lines = f.read().splitlines()
        i = 0
        while i < len(lines):
            match = _FENCE.match(lines[i])
            if not match:
                i += 1
                continue
            start, lang = i, match.group(1)
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
            previous = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
            skip = _SKIP.match(previous.strip())
            found.append((doc, start + 1, lang, "\n".join(lines[start + 1:end]),
                          skip.group(1) if skip else None))
            i = end + 1
    return found


SNIPPETS = [s for s in _snippets() if s[2] in ("python", "bash")]
RUNNABLE = [s for s in SNIPPETS if s[4] is None]


def _ids():
    """Stable test ids: the document and the snippet's rank among its runnable ones."""
    ids, seen = [], {}
    for doc, _, _, _, _ in RUNNABLE:
        seen[doc] = seen.get(doc, 0) + 1
        ids.append(f"{doc}#{seen[doc]}")
    return ids


def _markers():
    out = []
    for doc in DOCS:
        with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
            out += [(doc, n + 1, m.group(1)) for n, line in enumerate(f)
                    for m in [_SKIP.match(line.strip())] if m]
    return out


def test_skip_markers_precede_snippets_and_give_reasons():
    """The marked snippets are exactly the skipped ones: no stray marker, none without why."""
    skipped = [(doc, line) for doc, line, _, _, reason in SNIPPETS if reason is not None]
    markers = _markers()
    assert len(markers) == len(skipped), (markers, skipped)
    assert all(len(reason) > 20 for _, _, reason in markers), markers
    # Every other snippet is run by the tests below.
    assert len(RUNNABLE) + len(skipped) == len(SNIPPETS)
    assert any(lang == "python" for _, _, lang, _, _ in RUNNABLE)


# What each python snippet says it produces (its comments, its printed line), checked on the
# namespace it leaves and what it printed. Keyed by a line of the snippet, so a snippet that
# moves between documents keeps its check; a python snippet without one fails below.
def _claims_build_model(ns, out):
    # "registers the components": the YAML's plugin names resolve to the plugin's classes.
    assert type(ns["model"].backbone).__name__ == "CustomFPN"
    assert type(ns["model"].proposal_generator).__name__ == "PerLevelRPN"
    assert str(next(ns["model"].parameters()).device).startswith(ns["cfg"].MODEL.DEVICE)


def _claims_lazy(ns, out):
    assert out.strip().splitlines()[-1] == "CustomFPN PerLevelRPN"
    assert type(ns["model"].backbone.top_down_fusion).__name__ == "WeightedFusion"


def _claims_deploy(ns, out):
    assert "['proposal_levels']" in out  # the printed plugin field, as the comment shows
    assert ns["detections"].image_size == (256, 256)  # "Instances at the input size"
    result = ns["result"]
    assert result.image_size == (512, 512)  # "at the original size"
    # Detectron2's postprocessing drops boxes left empty after clipping; the rest come back
    # with masks pasted into the full image and boxes inside it.
    assert 0 < len(result) <= len(ns["detections"])
    assert tuple(result.pred_masks.shape[1:]) == (512, 512)
    assert float(result.pred_boxes.tensor.max()) <= 512


def _claims_mask_head(ns, out):
    assert ns["cfg"].MODEL.ROI_MASK_HEAD.NAME == "PANetMaskHead"
    assert ns["cfg"].MODEL.ROI_MASK_HEAD.POOLER_TYPE == ""


def _claims_neck(ns, out):
    assert list(ns["backbone"].output_shape()) == ["p3", "p4", "p5", "p6", "p7"]
    assert type(ns["backbone"]).__name__ == "CustomFPN"
    assert type(ns["pan"]).__name__ == "PAFPN"
    assert type(ns["neck"].top_down_fusion).__name__ == "WeightedFusion"
    assert list(ns["neck"].output_shape()) == ["p3", "p4", "p5", "p6"]  # maxpool top block


def _claims_rpn_keys(ns, out):
    assert ns["cfg"].MODEL.RPN.SHARED_HEAD is False  # the unshared-RPN config merged


def _claims_rpn_head(ns, out):
    assert type(ns["head"]).__name__ == "SharedConvGroupedRPNHead"  # "-> SharedConvGrouped..."


def _claims_model_zoo_use(ns, out):
    # A YAML and a LazyConfig config by name: both built from the plugin's components.
    assert out.strip().splitlines()[-1] == "CustomFPN PerLevelRPN"
    assert type(ns["model"].backbone).__name__ == "CustomFPN"
    assert type(ns["lazy_model"].backbone.top_down_fusion).__name__ == "WeightedFusion"


def _claims_bifpn(ns, out):
    assert type(ns["neck"]).__name__ == "BiFPN" and len(ns["neck"].cells) == 2
    shapes = {k: tuple(v.shape) for k, v in ns["out"].items()}
    assert list(shapes) == ["p2", "p3", "p4", "p5", "p6"]
    assert shapes["p2"] == (1, 256, 16, 24) and shapes["p6"] == (1, 256, 1, 2)  # as printed


def _claims_model_zoo_api(ns, out):
    lines = out.strip().splitlines()
    assert lines[0].endswith(ns["name"]) and os.path.isfile(lines[0])  # the file's path
    assert ns["cfg"].MODEL.BACKBONE.NAME == "build_resnet_custom_fpn_backbone"
    assert "model" in ns["lazy"] and not ns["model"].training  # LazyConfig; built in eval mode
    assert lines[-1] == f"{len(ns['model_zoo'].list_configs())} configs; CustomFPN"


def _claims_mask_scoring(ns, out):
    out_instances = ns["out"]
    assert len(out_instances) == 1 and tuple(out_instances.pred_masks.shape) == (1, 1, 14, 14)  # 2x the 7x7 pooled
    # mask_scores = the detection score x a predicted IoU in [0, 1]; scores stay the box score.
    assert float(out_instances.scores) == pytest.approx(0.9)
    assert 0.0 <= float(out_instances.mask_scores) <= 0.9


SNIPPET_CLAIMS = {
    "lazy_model = instantiate(lazy.model)": _claims_model_zoo_use,
    "from fpn_plugin.neck import BiFPN": _claims_bifpn,
    'print(len(model_zoo.list_configs()), "configs;"': _claims_model_zoo_api,
    "head = MaskScoringHead(": _claims_mask_scoring,
    "model = build_model(cfg)\n": _claims_build_model,
    "print(type(model.backbone).__name__, type(model.proposal_generator).__name__)":
        _claims_lazy,
    "result = postprocess(detections, 512, 512)": _claims_deploy,
    '"MODEL.ROI_MASK_HEAD.POOLER_TYPE", ""])': _claims_mask_head,
    "pan = PAFPN(": _claims_neck,
    "mask_rcnn_R_50_custom_fpn_unshared_rpn_1x.yaml": _claims_rpn_keys,
    "head = PerLevelRPNHead(": _claims_rpn_head,
}


def _claims_of(code):
    found = [check for key, check in SNIPPET_CLAIMS.items() if key in code + "\n"]
    return found


@pytest.mark.parametrize("doc, line, lang, code", [s[:4] for s in RUNNABLE], ids=_ids())
def test_snippet_runs_on_cpu(doc, line, lang, code, monkeypatch, capsys):
    """Python snippets run in this process (Detectron2 is imported already), bash in a shell;
    both from the repository root, on this CPU-only machine. A python snippet then gives what
    it says it does (SNIPPET_CLAIMS)."""
    if lang == "bash":
        result = subprocess.run(["bash", "-e", "-c", code], cwd=ROOT, capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 0, f"{doc}:{line}\n{result.stderr[-3000:]}"
        return
    import torch

    claims = _claims_of(code)
    assert len(claims) == 1, (f"{doc}:{line}: a python snippet needs exactly one entry in "
                              f"SNIPPET_CLAIMS checking what it claims (found {len(claims)})")
    monkeypatch.chdir(ROOT)
    before = torch.get_num_threads()
    namespace = {"__name__": "__snippet__"}
    try:
        exec(compile(code, f"{doc}:{line}", "exec"), namespace)
    finally:
        torch.set_num_threads(before)
    claims[0](namespace, capsys.readouterr().out)


def _node_ids_in(text):
    return sorted(set(_NODE_ID.findall(text)))


@pytest.fixture(scope="module")
def collected(request):
    """Node ids of this session, plus those of test files it did not collect."""
    def known(ids):
        have = {item.nodeid for item in request.session.items}
        files = sorted({i.split("::")[0] for i in ids} - {n.split("::")[0] for n in have})
        if files:
            out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                                  "-p", "no:cacheprovider", *files], cwd=ROOT,
                                 capture_output=True, text=True, timeout=600)
            have |= {line.strip() for line in out.stdout.splitlines() if "::" in line}
        return have
    return known


def _reliability_cases():
    with open(os.path.join(ROOT, "docs", "reliability.md"), encoding="utf-8") as f:
        rows = [line for line in f if re.match(r"^\|\s*\d+\s*\|", line)]
    return [[cell.strip() for cell in row.strip().strip("|").split("|")] for row in rows]


def test_reliability_doc_lists_at_least_80_cases_each_with_a_test():
    cases = _reliability_cases()
    assert len(cases) >= 80
    numbers = [int(c[0]) for c in cases]
    assert numbers == list(range(1, len(cases) + 1))
    for case in cases:
        assert len(case) == 4 and all(case), case  # number, input/fault, behaviour, tests
        assert _node_ids_in(case[3]), case


def test_every_test_the_docs_name_exists(collected):
    texts = []
    for doc in DOCS:
        with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
            texts.append(f.read())
    named = _node_ids_in("\n".join(texts))
    assert len(named) >= 60
    have = collected(named)
    # A parametrized test may be named as a whole (all its cases).
    missing = [n for n in named if n not in have and not any(h.startswith(n + "[") for h in have)]
    assert not missing, missing


_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# Pages whose headings other pages link to after the README's sections moved into docs/: links
# into them must name an existing heading too.
_ANCHORS_CHECKED = {"README.md", "docs/benchmarks.md", "docs/commands.md", "docs/config_keys.md",
                    "docs/demo.md", "docs/development.md", "docs/lazyconfig.md",
                    "docs/model_zoo.md"}


def _prose(text):
    """The text outside fenced code blocks."""
    out, in_code = [], False
    for line in text.splitlines():
        if _FENCE.match(line) or (in_code and line.strip() == "```"):
            in_code = not in_code
            continue
        if not in_code:
            out.append(line)
    return "\n".join(out)


def _anchor(heading):
    """GitHub's id of a markdown heading: lower case, punctuation dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(doc):
    with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
        return {_anchor(m.group(1)) for m in re.finditer(r"^#+ (.+)$", _prose(f.read()), re.M)}


def _broken_links(docs):
    broken = []
    for doc in docs:
        with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
            text = _prose(f.read())
        for target in _LINK.findall(text):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
                continue
            path, _, anchor = target.partition("#")
            resolved = os.path.normpath(os.path.join(os.path.dirname(doc), path)) if path else doc
            if not os.path.exists(os.path.join(ROOT, resolved)):
                broken.append(f"{doc}: {target} (no {resolved})")
            elif anchor and resolved.replace(os.sep, "/") in _ANCHORS_CHECKED \
                    and anchor not in _anchors(resolved):
                broken.append(f"{doc}: {target} (no heading #{anchor} in {resolved})")
    return broken


def test_every_relative_link_resolves():
    """Each relative link of README.md and docs/*.md names a file that exists (and, into the
    README and the pages its sections moved to, a heading that exists)."""
    links = sum(len(_LINK.findall(open(os.path.join(ROOT, d), encoding="utf-8").read()))
                for d in DOCS)
    assert links >= 40
    broken = _broken_links(DOCS)
    assert not broken, "\n".join(broken)


def test_link_check_catches_a_missing_file_and_heading(tmp_path, monkeypatch):
    docs = tmp_path / "docs"
    docs.mkdir()
    (tmp_path / "README.md").write_text("# Top\n\n## A heading (`X.Y`)\n\n[ok](docs/a.md) "
                                        "[ok](#a-heading-xy) [gone](docs/b.md) [bad](#nope)\n"
                                        "```bash\n[in code](missing.md)\n```\n")
    (docs / "a.md").write_text("[up](../README.md#top) [ext](https://example.com/x.md)\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", str(tmp_path))
    broken = _broken_links(["README.md", "docs/a.md"])
    assert broken == ["README.md: docs/b.md (no docs/b.md)",
                      "README.md: #nope (no heading #nope in README.md)"], broken

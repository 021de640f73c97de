"""
Every measured figure README.md and docs/ quote comes from a tracked results file that a
benchmark script rewrites:

- each ``benchmarks/results/NAME.json`` names the script that wrote it (its command), that
  script can rewrite it (``--write-results``), and ``NAME.md`` is exactly what the script renders
  from the JSON (``harness.render`` for ``harness.save``'s A/B tables, else the script's own
  ``render(payload)``);
- each ``<!-- bench:NAME -->`` block in README.md or docs/*.md is exactly ``NAME.md``;
- every other table of measurements (a header naming AP, times, memory, ratios) is tagged
  ``<!-- figures: SOURCE -->`` on the line before it, SOURCE being a file of this repository
  whose content holds each number of the table (several files joined by `` + ``: each number in
  one of them; or ``quoted: ...`` for figures quoted from
  elsewhere, never measured here).

New benchmarks fit in by writing through ``harness.save`` / ``harness.write_payload``.
"""
import glob
import importlib.util
import json
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
DOCS = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
RESULT_NAMES = sorted(os.path.splitext(os.path.basename(p))[0]
                      for p in glob.glob(os.path.join(RESULTS, "*.json")))
BLOCK = re.compile(r"<!-- bench:([\w.-]+) -->\n(.*?)<!-- /bench:\1 -->", re.S)
FIGURES_TAG = re.compile(r"<!-- figures: (.+?) -->\s*$")
# A table header with one of these words holds measurements.
MEASURED = re.compile(r"\b(AP\w*|median|ratio|time|times|seconds|memory|RSS|MiB|ms|s/it\w*|"
                      r"wall|speed|latency|value)\b", re.I)
NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?![\w.])")


def _load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def harness():
    return _load(os.path.join(ROOT, "benchmarks", "harness.py"), "bench_harness_for_results")


def _script(payload, name):
    match = re.match(r"python (benchmarks/[\w.]+\.py)\b", payload["command"])
    assert match, f"{name}.json: command {payload['command']!r} names no benchmarks/ script"
    return os.path.join(ROOT, match.group(1))


def _written_by_harness_save(payload):
    """harness.save's payloads (a table of A/B rows) render with harness.render; a script with
    a format of its own writes through harness.write_payload and defines render(payload)."""
    return isinstance(payload.get("rows"), list) and "labels" in payload


def test_there_are_results_files():
    assert RESULT_NAMES


@pytest.mark.parametrize("name", RESULT_NAMES)
def test_results_markdown_is_what_its_script_renders_from_the_json(name, harness):
    with open(os.path.join(RESULTS, f"{name}.json")) as f:
        payload = json.load(f)
    script = _script(payload, name)
    assert os.path.isfile(script), script
    source = open(script).read()
    # The script can rewrite its tracked results.
    assert "add_output_arguments(" in source and "args.write_results" in source, script
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", payload["date"])
    if _written_by_harness_save(payload):
        render = harness.render
    else:
        assert re.search(r"^def render\(payload\)", source, re.M), \
            f"{name}.json has its own format but {script} defines no render(payload)"
        render = _load(script, f"results_script_{name}").render
    with open(os.path.join(RESULTS, f"{name}.md")) as f:
        assert f.read() == harness.stale_banner(payload) + render(payload), \
            f"{name}.md differs from {name}.json's rendering"


OPENING = re.compile(r"^<!-- bench:([\w.-]+) -->$", re.M)


def _block_problems(doc, text, results_dir):
    """What is wrong with the bench blocks of one page: unclosed blocks, blocks without a
    results file, blocks that differ from it."""
    problems = []
    closed = {m.group(1) for m in BLOCK.finditer(text)}
    problems += [f"{doc}: bench:{name} is never closed" for name in OPENING.findall(text)
                 if name not in closed]
    for match in BLOCK.finditer(text):
        name, content = match.group(1), match.group(2)
        path = os.path.join(results_dir, f"{name}.md")
        if not os.path.isfile(path):
            problems.append(f"{doc}: block bench:{name} has no {path}")
            continue
        with open(path) as f:
            if content != f.read():
                problems.append(f"{doc}: block bench:{name} differs from {name}.md "
                                "(`python benchmarks/harness.py` rewrites it)")
    return problems


def test_every_bench_block_is_its_results_file():
    problems, blocks = [], 0
    for path in DOCS:
        with open(path) as f:
            text = f.read()
        blocks += len(BLOCK.findall(text))
        problems += _block_problems(os.path.relpath(path, ROOT), text, RESULTS)
    assert blocks
    assert not problems, "\n".join(problems)


def test_block_check_catches_a_changed_figure_a_missing_file_and_an_open_block(tmp_path):
    (tmp_path / "x.md").write_text("| a | b |\n|---|---|\n| t | 1.5 ms |\n")
    good = "text\n<!-- bench:x -->\n| a | b |\n|---|---|\n| t | 1.5 ms |\n<!-- /bench:x -->\n"
    assert _block_problems("doc", good, str(tmp_path)) == []
    assert "differs" in _block_problems("doc", good.replace("1.5", "1.4"), str(tmp_path))[0]
    assert "has no" in _block_problems("doc", good.replace("bench:x", "bench:y"),
                                       str(tmp_path))[0]
    assert "never closed" in _block_problems("doc", good.split("<!-- /")[0], str(tmp_path))[0]


def _tables(text):
    """(line index of the header, header, table lines) of every markdown table outside code."""
    lines = text.split("\n")
    in_code = False
    i = 0
    while i < len(lines):
        if lines[i].startswith("```"):
            in_code = not in_code
        elif (not in_code and lines[i].startswith("|") and i + 1 < len(lines)
              and re.match(r"\|[-|: ]+\|$", lines[i + 1])):
            j = i + 2
            while j < len(lines) and lines[j].startswith("|"):
                j += 1
            yield i, lines[i], lines[i:j]
            i = j
            continue
        i += 1


def _numbers_in(path):
    """Every number in a file, as floats (JSON parsed, other files scanned as text)."""
    with open(path) as f:
        text = f.read()
    found = {float(n) for n in NUMBER.findall(text)}
    if path.endswith(".json"):
        def walk(obj):
            if isinstance(obj, (int, float)) and not isinstance(obj, bool):
                found.add(float(obj))
            elif isinstance(obj, dict):
                for v in obj.values():
                    walk(v)
            elif isinstance(obj, list):
                for v in obj:
                    walk(v)
        walk(json.loads(text))
    return found


def _shown_from(token, numbers):
    """Whether the number written as ``token`` is one of ``numbers`` at the shown precision."""
    decimals = len(token.split(".")[1]) if "." in token else 0
    value = float(token)
    return any(abs(round(n, decimals) - value) < 10 ** -decimals / 2 + 1e-9 for n in numbers)


def _table_problems(doc, text):
    """Tables of measurements outside bench blocks without a source tag, and numbers of a
    tagged table that its source file does not hold."""
    untagged, unsupported = [], []
    outside = BLOCK.sub("", text)  # bench blocks are checked against their results files
    lines = outside.split("\n")
    for index, header, table in _tables(outside):
        if not MEASURED.search(header):
            continue
        tag = FIGURES_TAG.match(lines[index - 1]) if index else None
        where = f"{doc}: table {header!r}"
        if not tag:
            untagged.append(where)
            continue
        source = tag.group(1)
        if source.startswith("quoted: "):
            continue
        # A table may gather figures of several files: "FILE + FILE + ...".
        source_paths = [os.path.join(ROOT, s) for s in source.split(" + ")]
        absent = [p for p in source_paths if not os.path.isfile(p)]
        if absent:
            unsupported.append(f"{where}: source {source} does not exist "
                               f"({', '.join(os.path.relpath(p, ROOT) for p in absent)})")
            continue
        numbers = set().union(*(_numbers_in(p) for p in source_paths))
        for row in table[2:]:
            for token in NUMBER.findall(row):
                if not _shown_from(token, numbers):
                    unsupported.append(f"{where}: {token} not in {source}")
    return untagged, unsupported


def test_every_other_table_of_measurements_is_tagged_with_its_source():
    untagged, unsupported = [], []
    for path in DOCS:
        with open(path) as f:
            u, n = _table_problems(os.path.relpath(path, ROOT), f.read())
        untagged += u
        unsupported += n
    assert not untagged, "tables of measurements without a results block or source tag:\n" + \
        "\n".join(untagged)
    assert not unsupported, "\n".join(unsupported)


def test_table_check_catches_untagged_and_unsourced_figures(tmp_path):
    source = tmp_path / "results.json"
    source.write_text(json.dumps({"runs": [{"segm_AP": 74.6220353}]}))
    table = "| head | mask AP |\n|---|---|\n| parity | {} |\n"
    # A table of AP with no tag; a tag naming a source that holds the figure; one that does not.
    assert _table_problems("doc", "x\n\n" + table.format("74.6"))[0]
    tagged = f"x\n<!-- figures: {source} -->\n" + table  # (an absolute path: joined as is)
    assert _table_problems("doc", tagged.format("74.6")) == ([], [])
    assert _table_problems("doc", tagged.format("75.6"))[1]
    # Quoted figures and tables that measure nothing pass.
    assert _table_problems("doc", "<!-- figures: quoted: elsewhere -->\n" + table.format("1")) \
        == ([], [])
    assert _table_problems("doc", "| key | default |\n|---|---|\n| A | 2 |\n") == ([], [])
    # Several sources: each figure may come from any of them, and every file must exist.
    other = tmp_path / "other.md"
    other.write_text("| t | 1.5 ms |\n")
    both = f"x\n<!-- figures: {source} + {other} -->\n" + table
    assert _table_problems("doc", both.format("74.6")) == ([], [])
    assert _table_problems("doc", both.format("1.5")) == ([], [])
    assert _table_problems("doc", both.format("2.5"))[1]
    assert "does not exist" in _table_problems(
        "doc", f"x\n<!-- figures: {source} + {tmp_path}/gone.md -->\n" + table.format("74.6"))[1][0]


@pytest.mark.parametrize("name", [n for n in RESULT_NAMES if n == "bench_deploy"])
def test_deploy_results_say_pass_or_fail_per_form_with_the_cause_of_each_failure(name):
    """A form whose deployed detections fail the deploy tolerances reads FAIL, with a cause,
    in the rendered table (the JSON once said `within_tolerances: false` under a line that
    read like a pass)."""
    with open(os.path.join(RESULTS, f"{name}.json")) as f:
        checks = json.load(f)["checks"]
    with open(os.path.join(RESULTS, f"{name}.md")) as f:
        rows = {line.split("|")[1].strip(): line for line in f if line.startswith("| ")}
    assert checks
    for form, check in checks.items():
        row = rows[form]
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        if check["within_tolerances"]:
            assert cells[1].startswith("PASS"), row
        else:
            assert cells[1] == "**FAIL**", row
            assert len(cells[-1]) > 20, f"{form}: a FAIL without its cause"
        assert cells[2] == f"{check['paired']}/{check['eager_detections']}", row
        assert cells[3] == str(check["unpaired"]), row

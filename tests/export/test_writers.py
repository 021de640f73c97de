"""Atomic/streaming writers, instance-id maps and progress lines (pure helpers)."""
import json
import logging
import os

import cv2
import numpy as np
import pytest

from fpn_plugin.export import (
    ProgressLogger,
    StreamingJSONArrayWriter,
    atomic_write_json,
    instance_id_map,
    score_order,
)
from fpn_plugin.export.progress import format_eta
from fpn_plugin.export.writers import write_image


def _leftovers(folder):
    return [f for f in os.listdir(folder) if f.endswith(".tmp")]


def test_stream_writes_valid_json_array(tmp_path):
    path = str(tmp_path / "out.json")
    records = [{"i": i, "v": [1.5, None, "x"]} for i in range(5)]
    with StreamingJSONArrayWriter(path) as w:
        for r in records:
            w.write(r)
        assert not os.path.exists(path)  # nothing under the final name until committed
    assert json.load(open(path)) == records
    assert _leftovers(tmp_path) == []


def test_empty_stream_is_an_empty_array(tmp_path):
    path = str(tmp_path / "out.json")
    with StreamingJSONArrayWriter(path):
        pass
    assert json.load(open(path)) == []


def test_records_reach_disk_while_streaming(tmp_path):
    # Memory stays flat: the records are in the file, not held until close.
    path = str(tmp_path / "out.json")
    w = StreamingJSONArrayWriter(path)
    for i in range(200):
        w.write({"i": i, "pad": "x" * 1000})
    assert os.path.getsize(w.temp_path) > 150 * 1000
    w.close()
    assert len(json.load(open(path))) == 200


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_interrupted_stream_keeps_previous_file(tmp_path, exc):
    path = str(tmp_path / "out.json")
    atomic_write_json(path, [{"previous": True}])
    with pytest.raises(exc):
        with StreamingJSONArrayWriter(path) as w:
            w.write({"new": 1})
            raise exc()
    assert json.load(open(path)) == [{"previous": True}]
    assert _leftovers(tmp_path) == []


def test_interrupted_stream_without_previous_file_leaves_nothing(tmp_path):
    path = str(tmp_path / "out.json")
    with pytest.raises(RuntimeError):
        with StreamingJSONArrayWriter(path) as w:
            w.write({"new": 1})
            raise RuntimeError
    assert os.listdir(tmp_path) == []


def test_unserializable_record_does_not_corrupt_stream(tmp_path):
    path = str(tmp_path / "out.json")
    with StreamingJSONArrayWriter(path) as w:
        w.write({"a": 1})
        with pytest.raises(TypeError):
            w.write({"b": object()})
        w.write({"c": 3})
    assert json.load(open(path)) == [{"a": 1}, {"c": 3}]


@pytest.mark.parametrize("durable", [True, False])
def test_write_image_png16_roundtrip_and_atomic(tmp_path, durable):
    path = str(tmp_path / "sub" / "ids.png")
    ids = np.arange(12, dtype=np.uint16).reshape(3, 4) * 1000
    write_image(path, ids, durable=durable)
    back = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    assert back.dtype == np.uint16 and np.array_equal(back, ids)
    assert _leftovers(tmp_path / "sub") == []


def test_instance_id_map_highest_first_wins():
    masks = np.zeros((3, 4, 5), dtype=bool)
    masks[0, :2, :2] = True   # best instance
    masks[1, 1:3, 1:3] = True  # overlaps instance 0 at (1, 1)
    masks[2, 3, 4] = True
    ids = instance_id_map(masks)
    assert ids.dtype == np.uint16
    assert ids[1, 1] == 1  # the first (highest-score) instance is on top
    assert ids[2, 2] == 2 and ids[3, 4] == 3 and ids[0, 4] == 0
    assert set(np.unique(ids)) == {0, 1, 2, 3}
    assert instance_id_map(np.zeros((0, 2, 3), bool)).shape == (2, 3)


def test_score_order_is_descending_and_stable():
    order = score_order(np.array([0.2, 0.9, 0.2, 0.5]))
    assert order.tolist() == [1, 3, 0, 2]


class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_progress_eta_excludes_warmup(caplog):
    clock = _Clock()
    progress = ProgressLogger(10, "export", logging.getLogger("test_progress"), period_s=5,
                              warmup=1, clock=clock)
    with caplog.at_level(logging.INFO, logger="test_progress"):
        clock.t = 10.0  # slow first item
        progress.update()
        for _ in range(4):
            clock.t += 2.0
            progress.update()
    assert progress.seconds_per_item() == pytest.approx(2.0)
    assert progress.eta_seconds() == pytest.approx(10.0)
    assert "export 5/10 (50%)" in progress.message() and "ETA 0:00:10" in progress.message()
    # Lines at the first item and then at most every 5 s: t=10 and t=16.
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and lines[0].startswith("export 1/10")
    assert format_eta(3725.4) == "1:02:05"


def test_progress_logs_the_last_item(caplog):
    clock = _Clock()
    progress = ProgressLogger(3, "x", logging.getLogger("test_progress_last"), period_s=100,
                              clock=clock)
    with caplog.at_level(logging.INFO, logger="test_progress_last"):
        for t in (1.0, 2.0, 3.0):
            clock.t = t
            progress.update()
    assert [r.getMessage().split(",")[0] for r in caplog.records] == ["x 1/3 (33%)",
                                                                      "x 3/3 (100%)"]

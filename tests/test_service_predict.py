"""`ipdfer predict`: the service pipeline over files, JSON lines, no server."""
from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from service import cli
from service.pipeline import Pipeline
from service.predict import predict_files
from tests.data_samples import astronaut_jpegs
from tests.test_service_api import astronaut, encode


def test_predict_files_prints_one_json_line_per_file(service_pipeline, tmp_path):
    photos = [tmp_path / f"photo{i}.jpg" for i in range(2)]
    for path, jpg in zip(photos, astronaut_jpegs(2)):
        path.write_bytes(jpg)
    (tmp_path / "astronaut.png").write_bytes(encode(astronaut(), "PNG"))
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    files = [*photos, tmp_path / "astronaut.png", tmp_path / "broken.jpg", tmp_path / "missing.jpg"]
    out = io.StringIO()
    ok, failed = predict_files(service_pipeline, files, neutral_dir=tmp_path / "neutral", batch_size=2, out=out)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert (ok, failed) == (3, 2) and [line["file"] for line in lines] == [str(f) for f in files]
    for line in lines[:3]:
        assert line["faces"], line
        face = line["faces"][0]
        assert abs(sum(face["expression"]["probabilities"].values()) - 1) < 1e-3
        assert set(face["pose"]) == {"yaw", "pitch", "roll"}
        Image.open(face["neutral_file"]).load()  # the neutral render, as a PNG file
    assert lines[3]["error"] == "bad_image" and "corrupt" in lines[3]["detail"]
    assert lines[4]["error"] == "bad_image" and "cannot read" in lines[4]["detail"]


def test_ipdfer_predict_command(service_pipeline, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(Pipeline, "load", classmethod(lambda cls, settings, worker="": service_pipeline))
    crop = astronaut()[40:200, 145:305]
    (tmp_path / "face.png").write_bytes(encode(crop, "PNG"))
    assert cli.main(["predict", str(tmp_path / "face.png"), "--aligned"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    body = json.loads(line)
    assert body["file"].endswith("face.png") and len(body["faces"]) == 1 and body["faces"][0]["box"] is None
    assert cli.main(["predict", str(tmp_path / "nope.jpg")]) == 1  # every file failed
    assert "cannot read" in capsys.readouterr().out


def test_a_folder_stands_for_the_images_under_it(service_pipeline, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(Pipeline, "load", classmethod(lambda cls, settings, worker="": service_pipeline))
    (tmp_path / "set" / "b").mkdir(parents=True)
    jpgs = astronaut_jpegs(2)
    (tmp_path / "set" / "b" / "two.jpg").write_bytes(jpgs[1])
    (tmp_path / "set" / "one.JPG").write_bytes(jpgs[0])
    (tmp_path / "set" / "notes.txt").write_text("not an image")
    assert cli.main(["predict", str(tmp_path / "set")]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["file"] for line in lines] == [str(tmp_path / "set" / "b" / "two.jpg"),
                                                str(tmp_path / "set" / "one.JPG")]
    assert all(line["faces"] for line in lines)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no images"):
        cli.main(["predict", str(tmp_path / "empty")])

"""The dataset schema: clear errors naming the row and the field; importer for users' data."""

import json

import pytest

from refocus_ray.dataset import DatasetError, import_table, read_table

GOOD = {"question_id": "q1", "video_id": "v1", "video_path": "short.mp4",
        "question": "Which object appears first?", "options": ["cat", "rocket"], "answer": 1,
        "split": "test"}


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("change,message", [
    ({"options": []}, "row 2: field 'options' needs at least two options"),
    ({"options": None}, "row 2: missing required field 'options'"),
    ({"answer": 5}, "row 2: field 'answer' = 5 is out of range for 2 options"),
    ({"answer": "b"}, "row 2: field 'answer' must be an option index"),
    ({"split": "dev"}, "row 2: field 'split' must be train, val or test"),
    ({"question": ""}, "row 2: missing required field 'question'"),
    ({"options": ["cat", "cat"]}, "row 2: field 'options' repeats an option"),
    ({"question_id": "q1"}, "row 2: field 'question_id' 'q1' repeats row 1"),
])
def test_bad_rows_name_row_and_field(tmp_path, change, message):
    rows = [GOOD, {**GOOD, "question_id": "q2", **change}]
    with pytest.raises(DatasetError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_table(_jsonl(tmp_path / "qa.jsonl", rows))


def test_csv_import_resolves_videos_and_roundtrips(tmp_path, clip_dir):
    src = tmp_path / "qa.csv"
    src.write_text("question_id,video_id,video_path,question,options,answer,split\n"
                   f"q1,v1,{clip_dir / 'short.mp4'},What is shown?,bikes|cars,0,test\n")
    table = import_table(src, tmp_path / "out" / "qa.parquet")
    back = read_table(tmp_path / "out" / "qa.parquet")
    assert back.to_pylist() == table.to_pylist()
    assert back.column("options").to_pylist() == [["bikes", "cars"]]


def test_import_reports_missing_video(tmp_path):
    src = _jsonl(tmp_path / "qa.jsonl", [{**GOOD, "video_path": "nowhere.mp4"}])
    with pytest.raises(DatasetError, match="row 1: field 'video_path' 'nowhere.mp4' does not exist"):
        import_table(src, tmp_path / "qa.parquet")


def test_unknown_format_and_missing_file(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        read_table(tmp_path / "none.parquet")
    (tmp_path / "qa.txt").write_text("x")
    with pytest.raises(DatasetError, match="unknown dataset format"):
        read_table(tmp_path / "qa.txt")

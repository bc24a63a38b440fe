"""Every crafted input of `tests/fixtures/hostile/make_hostile.py` through one real job on Ray.

One shard per case; each test below checks one case's rows. The job must commit every shard,
give each member a row (ok, or error with its reason), and keep writing the rest of a shard.
"""

from __future__ import annotations

import tarfile

import pytest
from conftest import small_config
from fixtures.hostile import make_hostile

from jobs.dataset.reader import read_metadata
from jobs.orchestration.driver import run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def job(ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    for name, make in make_hostile.CASES.items():
        (root / "data" / f"{name}.tar").parent.mkdir(exist_ok=True)
        (root / "data" / f"{name}.tar").write_bytes(make())
    summary = run(small_config([root / "data"], root / "out"))
    rows = read_metadata(root / "out").to_pylist()
    by_case: dict[str, list[dict]] = {}
    for row in sorted(rows, key=lambda r: (r["source"], r["index"] < 0, abs(r["index"]))):
        by_case.setdefault(row["source"].rsplit("/", 1)[-1].removesuffix(".tar"), []).append(row)
    return root / "out", summary, by_case


def _status(rows):
    return [(r["key"], r["status"]) for r in rows]


def test_every_shard_is_committed(job):
    _, summary, by_case = job
    assert summary.complete and summary.shards_written == len(make_hostile.CASES)
    assert set(by_case) == set(make_hostile.CASES)


@pytest.mark.parametrize("case", ["cut-at-header", "cut-inside-header"])
def test_a_cut_tar_keeps_what_came_before_and_names_the_offset(job, case):
    rows = job[2][case]
    assert _status(rows[:2]) == [("k0", "ok"), ("k1", "ok")] and len(rows) == 3
    assert rows[2]["key"] == "__shard__" and rows[2]["error"].startswith("tar cut short: no end-of-archive blocks")


def test_members_webdataset_would_drop_are_rows(job):
    rows = job[2]["odd-members"]
    assert _status(rows) == [
        ("ok-0", "ok"),
        (".hidden.mp4", "error"),
        ("README", "error"),
        ("bad\\xff", "ok"),
        ("twice", "error"),
        ("ok-1", "ok"),
        ("link", "error"),
    ]
    assert "duplicate member" in rows[4]["error"] and "not a regular file" in rows[6]["error"]


def test_metadata_python_refuses_is_an_error_row_and_a_lone_surrogate_is_kept_escaped(job):
    rows = {r["key"]: r for r in job[2]["hostile-json"]}
    assert [rows[k]["status"] for k in ("ok-0", "deep", "digits", "surrogate", "ok-1")] == [
        "ok",
        "error",
        "error",
        "ok",
        "ok",
    ]
    assert "RecursionError" in rows["deep"]["error"] and "ValueError" in rows["digits"]["error"]
    assert rows["surrogate"]["caption"] == "a \\ud800 b"


def test_member_names_of_the_latent_tar_stay_inside_it(job):
    out, _, by_case = job
    rows = by_case["traversal-names"]
    assert _status(rows) == [("../../evil", "ok"), ("/abs/olute", "ok"), ("fine", "ok")]
    with tarfile.open(out / rows[0]["shard"]) as tar:
        names = tar.getnames()
    assert all(not n.startswith("/") and ".." not in n.split("/") for n in names), names


def test_bytes_that_are_not_an_allowed_container_never_reach_ffmpegs_probing(job):
    rows = job[2]["demuxer-tricks"]
    assert _status(rows) == [("ok-0", "ok"), ("concat", "error"), ("sdp", "error"), ("ok-1", "ok")]
    assert all("not a supported container" in r["error"] for r in rows[1:3])


def test_a_header_claiming_frames_the_file_lacks_is_an_error_row_not_fatal(job):
    rows = job[2]["lying-header"]
    assert _status(rows) == [("ok-0", "ok"), ("huge", "error")]
    assert rows[1]["error"].startswith("truncated: the container promises 4026531840 frames, ")
    assert rows[0]["src_num_frames"] > 0

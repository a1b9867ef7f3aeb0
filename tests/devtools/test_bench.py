"""``manage.py bench replay-openb`` on a tiny synthetic trace: one JSON object with the promised keys and ranges."""

import json
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

NODE_HEADER = "sn,cpu_milli,memory_mib,gpu,model"
POD_HEADER = (
    "name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec,qos,pod_phase,creation_time,deletion_time,scheduled_time"
)
# (cpu_milli, num_gpu, gpu_milli): fractions, whole GPUs and a CPU-only task, none larger than one GPU so that the
# arrivals of a 128-GPU cluster step by under 1% and every whole percent of demand has a sample.
POD_SHAPES = [(4000, 1, 300), (4000, 1, 500), (8000, 1, 1000), (2000, 1, 250), (6000, 1, 700), (1000, 0, 0)]


@pytest.fixture
def trace_dir(tmp_path):
    nodes = [f"n{i},96000,393216,8,T4" for i in range(16)]
    pods = [f"p{i},{cpu},8192,{k},{milli},,LS,Running,0,1,0" for i, (cpu, k, milli) in enumerate(POD_SHAPES * 10)]
    (tmp_path / "openb_node_list_gpu_node.csv").write_text("\n".join([NODE_HEADER, *nodes]) + "\n")
    (tmp_path / "openb_pod_list_default.csv").write_text("\n".join([POD_HEADER, *pods]) + "\n")
    return tmp_path


def bench(*args) -> dict:
    out = StringIO()
    call_command("bench", *args, stdout=out)
    return json.loads(out.getvalue())


def test_replay_prints_one_json_object_with_fgd_and_both_baselines(trace_dir):
    result = bench("replay-openb", "--trace-dir", str(trace_dir), "--seeds", "2", "--workers", "1")

    assert result["policy"] == "fgd"
    assert result["seeds"] == [42, 43]
    assert [row["seed"] for row in result["per_seed"]] == [42, 43]
    for key in ("gpu_alloc_ratio_at_100", "first_fit_alloc_ratio_at_100", "best_fit_alloc_ratio_at_100"):
        assert 0.5 < result[key] <= 1.0
    for row in result["per_seed"]:
        assert 0.5 < row["at_100"] <= 1.0 and 0.5 < row["first_fit_at_100"] <= 1.0
    assert result["published"]["fgd"]["at_100"] == 0.9523


def test_seed_list_overrides_the_seed_count_and_best_fit_can_be_skipped(trace_dir):
    options = ["--seed-list", "7,9", "--no-best-fit", "--until", "130", "--workers", "1"]
    result = bench("replay-openb", "--trace-dir", str(trace_dir), *options)

    assert result["seeds"] == [7, 9]
    assert "best_fit_alloc_ratio_at_100" not in result
    assert 0.5 < result["gpu_alloc_ratio_at_130"] <= 1.0


def test_replay_refuses_a_folder_without_the_trace(tmp_path):
    with pytest.raises(CommandError, match="trace files not found"):
        bench("replay-openb", "--trace-dir", str(tmp_path), "--workers", "1")


def test_staging_moves_the_bytes_intact_through_a_real_s3_server_and_prints_each_pace(tmp_path):
    result = bench("staging", "--size-mb", "4", "--dir", str(tmp_path))

    assert result["size_mb"] == 4 and result["sha256_intact"] is True
    for key in ("fetch_mb_s", "upload_mb_s", "raw_copy_mb_s", "store_get_mb_s", "store_put_mb_s", "sha256_mb_s"):
        assert result[key] > 0, key
    assert result["fetch_vs_raw"] == pytest.approx(result["fetch_mb_s"] / result["raw_copy_mb_s"], abs=0.002)
    assert list(tmp_path.iterdir()) == []  # its scratch is removed

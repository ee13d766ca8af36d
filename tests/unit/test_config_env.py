"""read_config (SHOAL_* parsing, precedence, bad values named) and detect_world for each launcher, with a
plain dict as the environment (nothing here reads or writes os.environ)."""

from __future__ import annotations

import dataclasses
import logging

import pytest

from shoal.core.config import ShoalConfig, env_name, flag_name, knobs
from shoal.core.env import (SLURM_BATCH_SOURCE, WorldInfo, detect_world, get_env, parse_slurm_first_node,
                            read_config)


# --------------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------------

def test_defaults_from_an_empty_environment():
    cfg = read_config({})
    assert cfg == ShoalConfig()
    assert cfg.timeout_s == 300.0 and cfg.check_collectives is True and cfg.backend is None


def test_one_name_per_knob():
    assert env_name("fusion_threshold_mb") == "SHOAL_FUSION_THRESHOLD_MB"
    assert flag_name("fusion_threshold_mb") == "--fusion-threshold-mb"
    assert {f.name for f in knobs()} == {f.name for f in dataclasses.fields(ShoalConfig)}
    for f in knobs():
        assert f.metadata.get("help"), f"{f.name} has no help text"


def test_environment_values_are_parsed_by_type():
    cfg = read_config({
        "SHOAL_TIMEOUT_S": " 12.5 ", "SHOAL_NUM_STREAMS": "3", "SHOAL_CHECK_COLLECTIVES": "off",
        "SHOAL_AUTOTUNE": "Yes", "SHOAL_BACKEND": "gloo", "SHOAL_LOCAL_SIZE": "2",
        "SHOAL_COMPRESSION": "bf16", "SHOAL_TIMELINE_FILENAME": "/tmp/t.json",
        "UNRELATED": "x", "SHOAL_NOT_A_KNOB": "ignored",  # ignored by read_config (init() warns)
    })
    assert cfg.timeout_s == 12.5 and cfg.num_streams == 3 and cfg.local_size == 2
    assert cfg.check_collectives is False and cfg.autotune is True
    assert cfg.backend == "gloo" and cfg.compression == "bf16" and cfg.timeline_filename == "/tmp/t.json"


@pytest.mark.parametrize("raw", ["none", "None", ""])
def test_optional_knobs_accept_none(raw):
    assert read_config({"SHOAL_LOCAL_SIZE": raw, "SHOAL_BACKEND": raw}).local_size is None


def test_keyword_overrides_beat_the_environment_and_none_means_unset():
    cfg = read_config({"SHOAL_TIMEOUT_S": "12", "SHOAL_NUM_STREAMS": "3"}, timeout_s=7.0, num_streams=None)
    assert cfg.timeout_s == 7.0 and cfg.num_streams == 3


@pytest.mark.parametrize("var, raw, needle", [
    ("SHOAL_NUM_STREAMS", "two", "SHOAL_NUM_STREAMS='two'"),
    ("SHOAL_TIMEOUT_S", "5m", "SHOAL_TIMEOUT_S='5m'"),
    ("SHOAL_CHECK_COLLECTIVES", "maybe", "SHOAL_CHECK_COLLECTIVES='maybe'"),
    ("SHOAL_COMPRESSION", "zip", "SHOAL_COMPRESSION"),
    ("SHOAL_BACKEND", "tcp", "--backend"),
    ("SHOAL_TIMEOUT_S", "0", "SHOAL_TIMEOUT_S"),
    ("SHOAL_NUM_STREAMS", "0", "num_streams"),
    ("SHOAL_LOCAL_SIZE", "-1", "local_size"),
])
def test_bad_values_name_the_variable(var, raw, needle):
    with pytest.raises(ValueError) as info:
        read_config({var: raw})
    assert needle in str(info.value)


def test_unknown_keyword_is_a_type_error():
    with pytest.raises(TypeError):
        read_config({}, no_such_knob=1)


def test_get_env_reads_the_given_mapping():
    assert get_env("NCCL_SOCKET_IFNAME", environ={"NCCL_SOCKET_IFNAME": "eth0"}) == "eth0"
    assert get_env("NCCL_SOCKET_IFNAME", "lo", environ={}) == "lo"


# --------------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------------

def test_torchrun():
    w = detect_world({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                      "MASTER_ADDR": "node0", "MASTER_PORT": "29500"})
    assert w == WorldInfo(3, 8, 1, 2, "env://", "node0", 29500, "torchrun")


def test_torchrun_without_local_variables():
    w = detect_world({"RANK": "0", "WORLD_SIZE": "2"})
    assert (w.rank, w.size, w.local_rank, w.local_size, w.source) == (0, 2, None, None, "torchrun")
    assert w.master_addr is None and w.master_port is None  # init() then says what to set


def test_testing_harness_file_store_wins_over_rank_variables():
    w = detect_world({"SHOAL_INIT_FILE": "/tmp/x/store", "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1",
                      "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "ignored", "MASTER_PORT": "1"})
    assert w == WorldInfo(1, 2, 1, 2, "file:///tmp/x/store", None, None, "file")


def test_open_mpi():
    w = detect_world({"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "16",
                      "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "4"})
    assert w == WorldInfo(5, 16, 1, 4, None, None, None, "mpi")  # rendezvous agreed through mpi4py
    w = detect_world({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2", "MASTER_ADDR": "h0",
                      "MASTER_PORT": "1234"})
    assert (w.init_method, w.master_addr, w.master_port) == ("env://", "h0", 1234)


def test_mpich_and_intel_mpi_pmi():
    w = detect_world({"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "2"})
    assert (w.rank, w.size, w.local_rank, w.local_size, w.source) == (2, 4, 0, 2, "mpi")


def test_mpirun_inside_a_slurm_allocation_is_mpi():
    w = detect_world({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2",
                      "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_NODELIST": "n1"})
    assert w.source == "mpi" and w.rank == 1


def test_slurm_srun():
    w = detect_world({"SLURM_PROCID": "7", "SLURM_NTASKS": "8", "SLURM_LOCALID": "3", "SLURM_STEP_ID": "0",
                      "SLURM_JOB_NODELIST": "gpu[03-05,9],cpu1", "SLURM_JOB_ID": "123456"})
    assert (w.rank, w.size, w.local_rank, w.source) == (7, 8, 3, "slurm")
    assert w.init_method == "env://" and w.master_addr == "gpu03"
    assert w.master_port == 15000 + 123456 % 20000  # one port per job


def test_slurm_respects_explicit_master_and_older_nodelist_name():
    w = detect_world({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_NODELIST": "a[1-2]", "SLURM_STEP_ID": "1",
                      "MASTER_ADDR": "login1", "MASTER_PORT": "4000"})
    assert (w.master_addr, w.master_port) == ("login1", 4000)
    # SLURM_STEPID is the older spelling of the step id; SLURM_NODELIST the older node list.
    w = detect_world({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_NODELIST": "a[1-2]", "SLURM_STEPID": "0"})
    assert w.master_addr == "a1" and w.source == "slurm"


# What slurmstepd exports to a batch script's own process (sbatch -N2 -n8 job.sh, no srun):
# SLURM_PROCID=0 and the job's SLURM_NTASKS, but no SLURM_STEP_ID / SLURM_STEPID.
BATCH_STEP = {"SLURM_JOB_ID": "4242", "SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_LOCALID": "0",
              "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_NNODES": "2"}


def test_slurm_batch_step_is_a_world_of_one_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="shoal.core.env"):
        w = detect_world(BATCH_STEP)
    assert w == WorldInfo(0, 1, 0, 1, None, None, None, SLURM_BATCH_SOURCE)
    [record] = [r for r in caplog.records if "SLURM batch script" in r.getMessage()]
    msg = record.getMessage()
    assert "SLURM_NTASKS=8" in msg and "HINT" in msg and "srun python train.py" in msg


def test_slurm_batch_step_quiet_and_single_task(caplog):
    with caplog.at_level(logging.WARNING, logger="shoal.core.env"):
        assert detect_world(BATCH_STEP, quiet=True).source == SLURM_BATCH_SOURCE
        one = detect_world({**BATCH_STEP, "SLURM_NTASKS": "1"})
    assert (one.size, one.source) == (1, SLURM_BATCH_SOURCE)
    assert not caplog.records  # quiet; and one task lost nothing, so nothing to warn about
    # The same job's srun tasks carry a step id: a real multi-rank world.
    w = detect_world({**BATCH_STEP, "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0"})
    assert (w.rank, w.size, w.source, w.master_addr) == (5, 8, "slurm", "gpu01")


def test_plain_python_is_a_world_of_one():
    assert detect_world({}) == WorldInfo(0, 1, 0, 1, None, None, None, "single")
    assert detect_world({"SLURM_PROCID": "0"}).source == "single"  # SLURM_NTASKS missing: not under srun


@pytest.mark.parametrize("nodelist, first", [
    ("node1", "node1"),                            # single host
    ("n[1-4]", "n1"),
    ("gpu[03-05,9],cpu1", "gpu03"),                # zero padding kept; commas inside brackets
    ("a[07,09]", "a07"),
    ("rack-2-host[010-012]", "rack-2-host010"),
    ("solo,other[1-2]", "solo"),                   # comma list
    ("n1,n2,n3", "n1"),
    (" n5 ", "n5"),
    ("node[1-2]-ib", "node1-ib"),                  # text after the brackets
    ("rack[1-2]-n[01-04]", "rack1-n01"),           # several brackets in one entry
    ("rack[3,1-2]-n[04-07]-ib,login[1-2]", "rack3-n04-ib"),
    ("node[001-128]", "node001"),
])
def test_slurm_node_list_first_host(nodelist, first):
    assert parse_slurm_first_node(nodelist) == first


@pytest.mark.parametrize("nodelist", ["[1-2]", "", "n[1-2", "n]1", "n[[1]]", ",n1", "n[a-b]"])
def test_bad_slurm_node_list_is_named(nodelist):
    with pytest.raises(ValueError, match="SLURM node list") as info:
        parse_slurm_first_node(nodelist)
    assert "HINT" in str(info.value)


# --------------------------------------------------------------------------------------------------------
# Non-finite values and unknown variables
# --------------------------------------------------------------------------------------------------------

_FLOAT_KNOBS = [f.name for f in knobs() if isinstance(f.default, float)]


@pytest.mark.parametrize("name", _FLOAT_KNOBS)
@pytest.mark.parametrize("raw", ["nan", "inf", "-inf", "NaN", "Infinity"])
def test_non_finite_values_name_the_knob_variable_and_flag(name, raw):
    # nan passes every range check (nan <= 0 is False) and inf passes them too; both used to fail later,
    # naming no setting.
    with pytest.raises(ValueError, match="must be a finite number") as info:
        read_config({env_name(name): raw})
    text = str(info.value)
    assert name in text and env_name(name) in text and flag_name(name) in text and "HINT" in text
    with pytest.raises(ValueError, match="must be a finite number"):
        read_config({}, **{name: float(raw)})  # the keyword path (init(timeout_s=inf)) too


def test_float_knobs_are_the_ones_checked():
    assert {"timeout_s", "fusion_threshold_mb", "first_bucket_mb", "stall_warning_s",
            "stall_timeout_s"} <= set(_FLOAT_KNOBS)


def test_negative_stall_timeout_is_refused_and_zero_means_default():
    with pytest.raises(ValueError, match="stall_timeout_s must be >= 0"):
        read_config({"SHOAL_STALL_TIMEOUT_S": "-1"})
    assert read_config({"SHOAL_STALL_TIMEOUT_S": "0"}).stall_timeout_s == 0.0


def test_unknown_shoal_variable_is_warned_once_with_the_closest_name(caplog):
    from shoal.core import env

    env._warned_unknown.discard("SHOAL_NAN_CHEK")
    environ = {"SHOAL_NAN_CHEK": "raise", "SHOAL_TIMEOUT_S": "5", "SHOAL_INIT_FILE": "/x",
               "SHOAL_TIMELINE": "/t.json", "SHOAL_JOB_SECRET": "ab" * 16, "OTHER": "1"}
    with caplog.at_level(logging.WARNING, logger="shoal.core.env"):
        assert env.warn_unknown_variables(environ) == ["SHOAL_NAN_CHEK"]
        assert env.warn_unknown_variables(environ) == ["SHOAL_NAN_CHEK"]  # init() twice: one warning
    [record] = caplog.records
    msg = record.getMessage()
    assert "SHOAL_NAN_CHEK is not a Shoal variable" in msg and "did you mean SHOAL_NAN_CHECK?" in msg
    assert "HINT" in msg


def test_unknown_variable_without_a_close_name_still_warns(caplog):
    from shoal.core import env

    env._warned_unknown.discard("SHOAL_ZZZZZZ")
    with caplog.at_level(logging.WARNING, logger="shoal.core.env"):
        env.warn_unknown_variables({"SHOAL_ZZZZZZ": "1"})
    [record] = caplog.records
    assert "SHOAL_ZZZZZZ is not a Shoal variable" in record.getMessage()
    assert "did you mean" not in record.getMessage()


def test_every_variable_shoal_sets_itself_is_known():
    from shoal.core import env

    known = env.known_variables()
    assert {env_name(f.name) for f in knobs()} <= known
    assert {"SHOAL_TIMELINE", "SHOAL_INIT_FILE", "SHOAL_JOB_SECRET", "SHOAL_CLUSTER_LINK"} <= known

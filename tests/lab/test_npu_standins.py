"""The lab's stand-ins for a node's Ascend software: the runtime shim mounts the driver files
(as the real runtime's base.list does) unless the node's runtime is switched to "not
installed", and the stand-in `npu-smi info` prints what a test set for that node."""

import json
import os
import subprocess

import pytest

import swarmlab

from .test_runtime_shim import bundle, run_shim  # noqa: F401  (bundle is a fixture)

NPU_SMI = str(swarmlab.FAKE_NPU_SMI)


def with_driver(tmp_path):
    driver = tmp_path / "driver"
    (driver / "lib64").mkdir(parents=True)
    (driver / "dcmi").mkdir()
    (driver / "npu-smi").write_text("")
    return driver


def test_shim_mounts_the_driver_files_read_only_like_the_runtime(bundle):  # noqa: F811
    driver = with_driver(bundle)
    proc, spec = run_shim(bundle, ["ASCEND_VISIBLE_DEVICES=0"])
    assert proc.returncode == 0, proc.stderr
    mounts = {m["destination"]: m for m in spec["mounts"]}
    assert mounts["/usr/local/Ascend/driver/lib64"]["source"] == str(driver / "lib64")
    assert mounts["/usr/local/dcmi"]["source"] == str(driver / "dcmi")
    assert mounts["/usr/local/bin/npu-smi"]["options"] == ["rbind", "ro"]


def test_a_node_whose_runtime_is_not_installed_gives_containers_nothing(bundle):  # noqa: F811
    with_driver(bundle)
    (bundle / "runtime-not-installed").write_text("")
    proc, spec = run_shim(bundle, ["ASCEND_VISIBLE_DEVICES=0-3"])
    assert proc.returncode == 0, proc.stderr
    assert spec["mounts"] == [{"destination": "/proc"}]
    assert "ASCEND_DOCKER_RUNTIME=True" not in spec["process"]["env"]


def npu_smi(tmp_path, state):
    (tmp_path / "npus").write_text("0\n1\n")
    (tmp_path / "npu-smi-state.json").write_text(json.dumps(state))
    env = {**os.environ, "NPU_SMI_STATE": str(tmp_path / "npu-smi-state.json")}
    return subprocess.run([NPU_SMI, "info"], capture_output=True, text=True, env=env, check=True)


def test_fake_npu_smi_prints_health_hbm_and_processes_per_npu(tmp_path):
    state = {
        "npus": {
            "1": {
                "health": "Critical",
                "hbm_used_mb": 30000,
                "processes": [{"pid": 4242, "name": "python3", "memory_mb": 28000}],
            }
        }
    }
    out = npu_smi(tmp_path, state).stdout
    rows = [line for line in out.splitlines() if "910B4" in line]
    assert len(rows) == 2 and "| OK " in rows[0] and "| Critical " in rows[1]
    assert "30000 / 32768" in out
    assert "No running processes found in NPU 0" in out
    assert "| 1       0                 | 4242          | python3" in out


@pytest.mark.lab
def test_npu_smi_in_a_container_on_a_node_shows_that_nodes_state(swarm_lab):
    swarm_lab.set_npu_state(2, {0: {"health": "Alarm", "hbm_used_mb": 1234}})
    try:
        client = swarm_lab.client(2)
        output = client.containers.run(
            swarmlab.IMAGE,
            ["npu-smi", "info"],
            environment={"ASCEND_VISIBLE_DEVICES": "0"},
            remove=True,
        ).decode()
    finally:
        swarm_lab.set_npu_state(2, {})
    assert "| Alarm " in output and "1234 / 32768" in output, output

"""NPUs reach a task only through the default runtime and ASCEND_VISIBLE_DEVICES.

The first tests run hack/ascend-runtime-shim directly on an OCI bundle, with a stand-in runc
that records how it was called; the others run real services in the lab.
"""

import json
import os
import subprocess
import urllib.request

import pytest

import swarmlab

SHIM = str(swarmlab.SHIM)


@pytest.fixture
def bundle(tmp_path):
    """An OCI bundle, a node's fake device dir and a runc that records its argv."""
    dev = tmp_path / "dev"
    dev.mkdir()
    for name in [f"davinci{i}" for i in range(8)] + ["davinci_manager", "devmm_svm", "hisi_hdc"]:
        (dev / name).write_text("")
    runc = tmp_path / "runc"
    runc.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/runc-args\n')
    runc.chmod(0o755)
    (tmp_path / "bundle").mkdir()
    return tmp_path


def run_shim(tmp_path, env_list, command="create"):
    spec = {"process": {"env": ["PATH=/usr/bin", *env_list]}, "mounts": [{"destination": "/proc"}]}
    config = tmp_path / "bundle" / "config.json"
    config.write_text(json.dumps(spec))
    args = [
        SHIM,
        f"--npu-dev-dir={tmp_path / 'dev'}",
        "--root",
        "/run/x",
        "--log",
        str(tmp_path / "log.json"),
        command,
        "--bundle",
        str(tmp_path / "bundle"),
        "ctr-id",
    ]
    proc = subprocess.run(
        args,
        check=False,
        capture_output=True,
        text=True,
        env={**os.environ, "NPUSWARM_SHIM_RUNC": str(tmp_path / "runc")},
    )
    return proc, json.loads(config.read_text())


def test_shim_mounts_exactly_the_listed_npus(bundle):
    proc, spec = run_shim(bundle, ["ASCEND_VISIBLE_DEVICES=0-2,4"])
    assert proc.returncode == 0, proc.stderr
    added = {m["destination"]: m["source"] for m in spec["mounts"][1:]}
    expected = [
        "davinci0",
        "davinci1",
        "davinci2",
        "davinci4",
        "davinci_manager",
        "devmm_svm",
        "hisi_hdc",
    ]
    assert added == {f"/dev/{n}": str(bundle / "dev" / n) for n in expected}
    assert "ASCEND_DOCKER_RUNTIME=True" in spec["process"]["env"]
    # runc gets the original command line, without the shim's own option
    assert (bundle / "runc-args").read_text().split() == [
        "--root",
        "/run/x",
        "--log",
        str(bundle / "log.json"),
        "create",
        "--bundle",
        str(bundle / "bundle"),
        "ctr-id",
    ]


def test_shim_adds_nothing_without_the_env(bundle):
    proc, spec = run_shim(bundle, [])
    assert proc.returncode == 0
    assert spec == {"process": {"env": ["PATH=/usr/bin"]}, "mounts": [{"destination": "/proc"}]}


def test_shim_leaves_other_commands_alone(bundle):
    proc, spec = run_shim(bundle, ["ASCEND_VISIBLE_DEVICES=1"], command="start")
    assert proc.returncode == 0
    assert len(spec["mounts"]) == 1
    assert (bundle / "runc-args").read_text().split()[4] == "start"


def test_shim_refuses_an_npu_the_node_does_not_have(bundle):
    proc, _ = run_shim(bundle, ["ASCEND_VISIBLE_DEVICES=3,9"])
    assert proc.returncode == 1
    assert not (bundle / "runc-args").exists()
    logged = json.loads((bundle / "log.json").read_text().splitlines()[-1])
    assert logged["level"] == "error"
    assert "NPU davinci9 requested by ASCEND_VISIBLE_DEVICES does not exist" in logged["msg"]


def test_shim_refuses_a_malformed_device_list(bundle):
    proc, _ = run_shim(bundle, ["ASCEND_VISIBLE_DEVICES=all"])
    assert proc.returncode == 1
    assert "invalid ASCEND_VISIBLE_DEVICES='all'" in proc.stderr


def test_shim_mounts_hccn_tool_where_the_driver_installs_it(bundle):
    """Read-only at /usr/local/Ascend/driver/tools/hccn_tool, the path HCCL's RoCE checks and
    MindCluster's exporter call; only into containers given NPUs."""
    driver = bundle / "driver"
    driver.mkdir()
    (driver / "hccn_tool").write_text("")
    proc, spec = run_shim(bundle, ["ASCEND_VISIBLE_DEVICES=3"])
    assert proc.returncode == 0, proc.stderr
    mounts = {m["destination"]: m for m in spec["mounts"]}
    assert mounts["/usr/local/Ascend/driver/tools/hccn_tool"] == {
        "destination": "/usr/local/Ascend/driver/tools/hccn_tool",
        "type": "bind",
        "source": str(driver / "hccn_tool"),
        "options": ["rbind", "ro"],
    }
    _, untouched = run_shim(bundle, [])
    assert untouched["mounts"] == [{"destination": "/proc"}]


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=3) as resp:
        return json.load(resp)


@pytest.mark.lab
def test_task_with_visible_devices_sees_exactly_those_npus(swarm_lab, services):
    node = swarm_lab.node(2)
    service = services.fake_vllm(
        "shim-tp2",
        swarm_lab.node_id(2),
        ["org/m", "--tensor-parallel-size", "2"],
        env={"ASCEND_VISIBLE_DEVICES": "1,3"},
        published_port=18001,
    )
    services.wait_task_state(service, {"running"})
    npus = swarmlab.wait_for(
        lambda: get_json(f"http://{node.address}:18001/npus"), "/npus of shim-tp2", 30
    )
    assert npus["devices"] == ["davinci1", "davinci3"]
    assert npus["control_devices"] == ["davinci_manager", "devmm_svm", "hisi_hdc"]
    assert npus["ASCEND_DOCKER_RUNTIME"] == "True"
    assert npus["tensor_parallel_size"] == 2


@pytest.mark.lab
def test_task_without_visible_devices_gets_no_npu_and_fails(swarm_lab, services):
    service = services.fake_vllm(
        "shim-none", swarm_lab.node_id(2), ["org/m", "--tensor-parallel-size", "1"]
    )
    task = services.wait_task_state(service, {"failed"})
    assert task["Status"]["ContainerStatus"]["ExitCode"] == 1
    container = swarm_lab.client(2).containers.get(task["Status"]["ContainerStatus"]["ContainerID"])
    assert "no Ascend NPU found" in container.logs().decode()


@pytest.mark.lab
def test_task_asking_for_a_missing_npu_fails_with_the_runtime_error(swarm_lab, services):
    service = services.fake_vllm(
        "shim-missing", swarm_lab.node_id(3), ["org/m"], env={"ASCEND_VISIBLE_DEVICES": "8"}
    )
    task = services.wait_task_state(service, {"failed", "rejected"})
    assert (
        "NPU davinci8 requested by ASCEND_VISIBLE_DEVICES does not exist" in task["Status"]["Err"]
    )

"""The lab's stand-ins for a node's Ascend software: the runtime shim mounts the driver files
(as the real runtime's base.list does) unless the node's runtime is switched to "not
installed", and the stand-in `npu-smi` and `hccn_tool` print, in the real tools' formats, what
a test set for that node.

The format tests run the stand-ins on the host with a state file; the expected texts are what
npu-smi 23.x and the 910B hccn_tool print (see docs/swarm-lab.md for the sources)."""

import json
import os
import subprocess

import pytest

import swarmlab
from npuswarm.nodehealth import npusmi

from .test_runtime_shim import bundle, run_shim  # noqa: F401  (bundle is a fixture)

NPU_SMI = str(swarmlab.FAKE_NPU_SMI)
HCCN_TOOL = str(swarmlab.FAKE_HCCN_TOOL)
# What the runtime mounts, where: the node agent calls them by these paths.
NPU_SMI_PATH = "/usr/local/bin/npu-smi"
HCCN_TOOL_PATH = "/usr/local/Ascend/driver/tools/hccn_tool"


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


def npu_smi(tmp_path, state, *args: str, check: bool = True):
    """The stand-in on the host, for a node with NPUs 0 and 1 whose state is `state`."""
    (tmp_path / "npus").write_text("0\n1\n")
    (tmp_path / "npu-smi-state.json").write_text(json.dumps(state))
    env = {**os.environ, "NPU_SMI_STATE": str(tmp_path / "npu-smi-state.json")}
    return subprocess.run(
        [NPU_SMI, *(args or ["info"])], capture_output=True, text=True, env=env, check=check
    )


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


# --- npu-smi on the host ---------------------------------------------------------------------

IDLE_TABLE = """\
+------------------------------------------------------------------------------------------------+
| npu-smi 23.0.6                   Version: 23.0.6                                               |
+---------------------------+---------------+----------------------------------------------------+
| NPU   Name                | Health        | Power(W)    Temp(C)           Hugepages-Usage(page)|
| Chip                      | Bus-Id        | AICore(%)   Memory-Usage(MB)  HBM-Usage(MB)        |
+===========================+===============+====================================================+
| 0     910B4               | OK            | 86.5        40                0    / 0             |
| 0                         | 0000:C1:00.0  | 0           0    / 0          0 / 32768            |
+===========================+===============+====================================================+
| 1     910B4               | OK            | 86.5        40                0    / 0             |
| 0                         | 0000:C2:00.0  | 0           0    / 0          0 / 32768            |
+===========================+===============+====================================================+
+---------------------------+---------------+----------------------------------------------------+
| NPU     Chip              | Process id    | Process name             | Process memory(MB)      |
+===========================+===============+====================================================+
| No running processes found in NPU 0                                                            |
+===========================+===============+====================================================+
| No running processes found in NPU 1                                                            |
+===========================+===============+====================================================+
"""
# NPU 1 busy and alarmed: the values every -t type below reads.
BUSY = {
    "1": {
        "health": "Alarm",
        "error_codes": [0x80E18402, 0x8C03A000],
        "error_information": ["node type=SoC, sensor type=Chip Hardware, event state=fault"],
        "temperature_c": 71,
        "power_w": 301.5,
        "aicore_percent": 97,
        "hbm_used_mb": 30000,
    }
}


def test_fake_npu_smi_table_of_idle_npus_is_unchanged(tmp_path):
    assert npu_smi(tmp_path, {}).stdout == IDLE_TABLE


def test_fake_npu_smi_table_shows_power_temperature_and_aicore_in_the_same_columns(tmp_path):
    out = npu_smi(tmp_path, {"npus": BUSY}).stdout
    lines = out.splitlines()
    assert lines[9] == (
        "| 1     910B4               | Alarm         | 301.5       71                0    / 0"
        "             |"
    )
    assert lines[10] == (
        "| 0                         | 0000:C2:00.0  | 97          0    / 0          30000 / 32768"
        "        |"
    )
    assert {len(line) for line in lines} == {len(IDLE_TABLE.splitlines()[0])}
    readings = npusmi.parse_npu_smi(out)
    assert readings[1] == npusmi.NpuReading(
        1,
        "Alarm",
        30000,
        32768,
        (),
        name="910B4",
        bus_id="0000:C2:00.0",
        power_w=301.5,
        temperature_c=71.0,
        aicore_percent=97.0,
    )
    assert readings[0].healthy and not readings[1].healthy


HEALTH_CARD = """\
\tNPU ID                         : 1
\tChip Count                     : 1

\tHealth                         : Alarm
\tChip ID                        : 0

"""
HEALTH_CHIP_ALARM = """\
\tHealth Status                  : Alarm
\tError Code                     : 80E18402 8C03A000
\tError Information              : node type=SoC, sensor type=Chip Hardware, event state=fault

\t                               : 2349047808
"""
HEALTH_CHIP_OK = """\
\tHealth Status                  : OK
\tError Code                     : NA
\tError Information              : NA
"""


def test_fake_npu_smi_health_of_a_card_is_the_raw_health_only(tmp_path):
    """npu-smi 23.x: without -c, `-t health` prints `Health`, no error codes."""
    assert npu_smi(tmp_path, {"npus": BUSY}, "info", "-t", "health", "-i", "1").stdout == (
        HEALTH_CARD
    )


def test_fake_npu_smi_health_of_a_chip_has_the_error_codes_in_hex(tmp_path):
    """With -c 0: Health Status, the codes as %04X, one information line per code (a code
    with no text is shown in decimal, as when DCMI has none)."""
    busy = npu_smi(tmp_path, {"npus": BUSY}, "info", "-t", "health", "-i", "1", "-c", "0")
    assert busy.stdout == HEALTH_CHIP_ALARM  # 2349047808 == 0x8C03A000
    idle = npu_smi(tmp_path, {"npus": BUSY}, "info", "-t", "health", "-i", "0", "-c", "0")
    assert idle.stdout == HEALTH_CHIP_OK


def test_fake_npu_smi_chip_health_without_error_codes_reads_ok_like_the_real_one(tmp_path):
    """The driver reports a Warning/Alarm/Critical that comes with no error code as OK in
    `-t health -c` (the table and the card view keep the raw health)."""
    state = {"npus": {"1": {"health": "Critical"}}}
    chip = npu_smi(tmp_path, state, "info", "-t", "health", "-i", "1", "-c", "0").stdout
    assert chip == HEALTH_CHIP_OK
    card = npu_smi(tmp_path, state, "info", "-t", "health", "-i", "1").stdout
    assert "\tHealth                         : Critical\n" in card


USAGES_CHIP = """\
\tDDR Capacity(MB)               : 0
\tDDR Usage Rate(%)              : 0
\tDDR Hugepages Total(page)      : 0
\tDDR Hugepages Usage Rate(%)    : 0
\tHBM Capacity(MB)               : 32768
\tHBM Usage Rate(%)              : 91
\tAicore Usage Rate(%)           : 97
\tAivector Usage Rate(%)         : 97
\tAicpu Usage Rate(%)            : 0
\tCtrlcpu Usage Rate(%)          : 0
\tDDR Bandwidth Usage Rate(%)    : 0
\tHBM Bandwidth Usage Rate(%)    : 0
\tNPU Utilization(%)             : 97
\tAicube Usage Rate(%)           : 97
"""
CARD_HEAD = "\tNPU ID                         : 1\n\tChip Count                     : 1\n\n"
CARD_TAIL = "\tChip ID                        : 0\n\n"
COMMON = """\
\tNPU ID                         : 1
\tChip Count                     : 1

\tChip ID                        : 0
\tMemory Usage Rate(%)           : 0
\tHBM Usage Rate(%)              : 91
\tAicore Usage Rate(%)           : 97
\tAicore Freq(MHZ)               : 1800
\tAicore curFreq(MHZ)            : 1800
\tAicore Count                   : 20
\tTemperature(C)                 : 71
\tNPU Real-time Power(W)         : 301.5
"""
MEMORY_CHIP = """\
\tDDR Capacity(MB)               : 0
\tDDR Clock Speed(MHz)           : 0
\tHBM Capacity(MB)               : 32768
\tHBM Clock Speed(MHz)           : 1600
\tHBM Temperature(C)             : 71
\tHBM Manufacturer ID            : 0x5A
"""
BOARD_CARD = """\
\tNPU ID                         : 1
\tProduct Name                   : NA
\tModel                          : NA
\tManufacturer                   : NA
\tSerial Number                  : NA
\tSoftware Version               : 23.0.6
\tFirmware Version               : 7.1.0.5.220
\tCompatibility                  : OK
\tBoard ID                       : 0x64
\tPCB ID                         : A
\tBOM ID                         : 1
\tPCIe Bus Info                  : 0000:C2:00.0
\tSlot ID                        : 1
\tClass ID                       : NA
\tPCI Vendor ID                  : 0x19E5
\tPCI Device ID                  : 0xD802
\tSubsystem Vendor ID            : 0x19E5
\tSubsystem Device ID            : 0x3005
\tChip Count                     : 1
"""
BOARD_CHIP = """\
\tNPU ID                         : 1
\tChip ID                        : 0
\tChip Type                      : Ascend
\tChip Name                      : 910B4
\tChip Version                   : V1
\tBoard ID                       : 0x64
\tPCB ID                         : NA
\tBOM ID                         : 1
\tVDie ID                        : 10000001 11010102 12020203 13030304 14040405
\tNDie ID                        : 20000001 21010102 22020203 23030304 24040405
\tChip Position ID               : 1
\tPCIe Bus Info                  : 0000:C2:00.0
\tFirmware Version               : 7.1.0.5.220
"""
TEMP_CHIP = "\tNPU Temperature (C)            : 71\n"
POWER_CHIP = "\tNPU Real-time Power(W)         : 301.5\n"


@pytest.mark.parametrize(
    ("kind", "chip", "card"),
    [
        ("usages", USAGES_CHIP, CARD_HEAD + USAGES_CHIP + CARD_TAIL),
        ("temp", TEMP_CHIP, CARD_HEAD + TEMP_CHIP + CARD_TAIL),
        ("power", POWER_CHIP, CARD_HEAD + POWER_CHIP + CARD_TAIL),
        ("memory", MEMORY_CHIP, CARD_HEAD + MEMORY_CHIP + CARD_TAIL),
        ("board", BOARD_CHIP, BOARD_CARD),
        ("common", None, COMMON),
    ],
)
def test_fake_npu_smi_typed_queries_of_a_card_and_of_its_chip(tmp_path, kind, chip, card):
    state = {"npus": BUSY}
    assert npu_smi(tmp_path, state, "info", "-t", kind, "-i", "1").stdout == card
    by_chip = npu_smi(tmp_path, state, "info", "-t", kind, "-i", "1", "-c", "0", check=False)
    if chip is None:  # common has no chip view
        assert by_chip.returncode == 215
        assert by_chip.stdout.startswith(
            'Error parameter in querying chip info, type: "common".\nUsage: npu-smi info '
        )
    else:
        assert (by_chip.returncode, by_chip.stdout) == (0, chip)


def test_fake_npu_smi_typed_queries_of_an_idle_npu_show_the_defaults(tmp_path):
    def value(kind, name):
        out = npu_smi(tmp_path, {}, "info", "-t", kind, "-i", "0", "-c", "0").stdout
        return {k.strip(): v for k, v in (line.split(" : ", 1) for line in out.splitlines())}[name]

    assert value("temp", "NPU Temperature (C)") == "40"
    assert value("power", "NPU Real-time Power(W)") == "86.5"
    assert value("usages", "Aicore Usage Rate(%)") == "0"
    assert value("usages", "HBM Usage Rate(%)") == "0"


def test_fake_npu_smi_maps_npu_chip_and_logic_ids(tmp_path):
    assert npu_smi(tmp_path, {}, "info", "-m").stdout == (
        f"\t{'NPU ID':<30} {'Chip ID':<30} {'Chip Logic ID':<30} {'Chip Name':<30}\n"
        f"\t{0:<30} {0:<30} {0:<30} Ascend 910B4\n"
        f"\t{1:<30} {0:<30} {1:<30} Ascend 910B4\n"
    )


@pytest.mark.parametrize(
    ("args", "code", "first_lines", "stderr"),
    [
        (
            ["info", "-t", "health", "-i", "7"],
            215,
            ["Invalid card id.", "Error parameter of -i"],
            "",
        ),
        (
            ["info", "-t", "health", "-i", "1", "-c", "1"],
            215,
            ["Invalid chip id.", "Error parameter of -c"],
            "",
        ),
        (["info", "-t", "bogus", "-i", "0"], 215, ["Error parameter of -t"], ""),
        (["info", "-t", "health"], 215, ["", "This command must input card id.", ""], ""),
        (
            ["info", "-t", "ecc", "-i", "0"],
            215,
            ["Error parameter of -t"],
            "-t ecc is not stood in",
        ),
        (["info", "watch"], 215, [], "`info watch` is not stood in"),
        (["status"], 211, ["Command or option is not found."], ""),
    ],
)
def test_fake_npu_smi_refuses_like_the_real_one(tmp_path, args, code, first_lines, stderr):
    """The messages and usage on stdout, the exit status npu-smi's error code modulo 256."""
    proc = npu_smi(tmp_path, {}, *args, check=False)
    assert proc.returncode == code
    lines = proc.stdout.splitlines()
    assert lines[: len(first_lines)] == first_lines
    usage = "Usage: npu-smi info <watch|proc|-h|-m|-l|-t type> [Options...]"
    assert lines[len(first_lines)] == (
        usage if code == 215 else "Usage: npu-smi <Command|-h|-v> [Options...]"
    )
    assert stderr in proc.stderr


# --- hccn_tool on the host ---------------------------------------------------------------------


def hccn_tool(tmp_path, state, *args: str):
    """The stand-in on the host with `state` (as swarmlab.roce_state writes it)."""
    path = tmp_path / "hccn-tool-state.json"
    path.write_text(json.dumps(state))
    env = {**os.environ, "HCCN_TOOL_STATE": str(path)}
    return subprocess.run([HCCN_TOOL, *args], capture_output=True, text=True, env=env, check=False)


def fabric(roce=None):
    """Node 2's view of a 3-node lab with 4 NPUs per node."""
    cfg = swarmlab.LabConfig(name="unit", nodes=3, npus=4)
    return swarmlab.roce_state(cfg, 2, roce or {})


@pytest.mark.parametrize(
    ("args", "stdout"),
    [
        (["-link", "-g"], "link status: UP\n"),
        (["-net_health", "-g"], "net health status: Success\n"),
        (["-ip", "-g"], "ipaddr:192.168.103.2\nnetmask:255.255.255.0\n"),
        (["-netdetect", "-g"], "netdetect addr: 192.168.103.254\n"),
        (["-gateway", "-g"], "default gateway:192.168.103.254, Iface:eth3\n"),
    ],
)
def test_fake_hccn_tool_defaults_of_a_node(tmp_path, args, stdout):
    proc = hccn_tool(tmp_path, fabric(), "-i", "3", *args)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, stdout, "")


def test_fake_hccn_tool_reports_what_a_test_set(tmp_path):
    roce = {
        "2": {
            "3": {"link": "DOWN"},
            "1": {"ip": None, "gateway": None, "netdetect": None},
            "2": {"net_health": "Receive timeout"},
        }
    }

    def run(npu, *args):
        proc = hccn_tool(tmp_path, fabric(roce), "-i", str(npu), *args)
        return proc.returncode, proc.stdout, proc.stderr

    assert run(3, "-link", "-g") == (0, "link status: DOWN\n", "")
    assert run(3, "-net_health", "-g") == (0, "net health status: Fault\n", "")
    assert run(2, "-net_health", "-g") == (0, "net health status: Receive timeout\n", "")
    assert run(1, "-net_health", "-g") == (0, "net health status: Init\n", "")
    assert run(1, "-ip", "-g") == (13, "", "Get ipconf failed, because no ip was preset there!\n")
    assert run(1, "-gateway", "-g") == (
        2,
        "",
        "Get gateway failed, because no gateway was preset there!\n",
    )
    assert run(1, "-netdetect", "-g") == (0, "netdetect addr: 0.0.0.0\n", "")


PING_OK = """\
device 0 PING 192.168.101.3
recv seq=0,time=0.114000ms
recv seq=1,time=0.067000ms
recv seq=2,time=0.063000ms
3 packets transmitted, 3 received, 0.00% packet loss
"""
PING_LOST = """\
device 0 PING 192.168.101.3
recv time out seq=0
recv time out seq=1
recv time out seq=2
3 packets transmitted, 0 received, 100.00% packet loss
"""


def test_fake_hccn_tool_ping_answers_for_npus_of_the_lab_whose_link_is_up(tmp_path):
    def ping(roce, address="192.168.101.3"):
        proc = hccn_tool(tmp_path, fabric(roce), "-i", "0", "-ping", "-g", "address", address)
        return proc.returncode, proc.stdout, proc.stderr

    assert ping({}) == (0, PING_OK, "")
    # the target (node 3's NPU 1) is down, or this NPU's link is, or the address is nobody's
    lost = (1, PING_LOST, "Command execute failed!\n")
    assert ping({"3": {"1": {"link": "DOWN"}}}) == lost
    assert ping({"2": {"0": {"link": "DOWN"}}}) == lost
    assert ping({}, "192.168.101.9") == (1, PING_LOST.replace(".3\n", ".9\n", 1), lost[2])


@pytest.mark.parametrize(
    ("args", "code", "stderr"),
    [
        (["-i", "4", "-link", "-g"], 4, "Get invalid device id.\n"),
        (["-i", "0", "-foo", "-g"], 3, "Get invalid major cmd.\n"),
        (
            ["-i", "0", "-lldp", "-g"],
            3,
            "fake hccn_tool: -lldp is not stood in\nGet invalid major cmd.\n",
        ),
        (["-i", "0", "-link", "-s", "down"], 3, "Get unknown option!\n"),
        (["-i", "0", "-ping", "-g"], 4, "The total count of input parameters is wrong!\n"),
        (
            ["-i", "0", "-ping", "-g", "address", "1.2.3"],
            6,
            "The ip address you configured is invalid!\n",
        ),
    ],
)
def test_fake_hccn_tool_refuses_like_the_real_one(tmp_path, args, code, stderr):
    """The messages on stderr, the exit status hccn_tool's error code modulo 256."""
    proc = hccn_tool(tmp_path, fabric(), *args)
    assert (proc.returncode, proc.stdout) == (code, "")
    assert proc.stderr.startswith(stderr)


def test_set_roce_state_reaches_every_nodes_hccn_tool(tmp_path, monkeypatch):
    """Lab.set_roce_state on the files make_fake_npus lays out, without a lab: the node it
    names reports the change, the others see it only through -ping; {} restores defaults."""
    monkeypatch.setattr(swarmlab, "STATE_ROOT", tmp_path)
    cfg = swarmlab.LabConfig(name="unit", nodes=2, npus=4)
    for node in cfg.all_nodes():
        swarmlab.make_fake_npus(cfg, node)
    lab = swarmlab.Lab(cfg)

    def run(index, *args):
        driver = cfg.node(index).driver_dir
        env = {**os.environ, "HCCN_TOOL_STATE": str(driver / "dcmi" / swarmlab.ROCE_STATE)}
        proc = subprocess.run(
            [str(driver / "hccn_tool"), *args], capture_output=True, text=True, env=env, check=False
        )
        return proc.returncode, proc.stdout.splitlines()[-1]

    assert run(2, "-i", "2", "-ip", "-g") == (0, "netmask:255.255.255.0")
    lab.set_roce_state(1, {2: {"link": "DOWN"}})
    assert run(1, "-i", "2", "-link", "-g") == (0, "link status: DOWN")
    assert run(2, "-i", "2", "-link", "-g") == (0, "link status: UP")
    ping = ("-i", "2", "-ping", "-g", "address", "192.168.102.1")
    assert run(2, *ping)[0] == 1
    lab.set_roce_state(2, {0: {"net_health": "Unreachable"}})  # node 1's setting stays
    assert run(2, *ping)[0] == 1
    assert run(2, "-i", "0", "-net_health", "-g") == (0, "net health status: Unreachable")
    lab.set_roce_state(1, {})
    assert run(2, *ping) == (0, "3 packets transmitted, 3 received, 0.00% packet loss")


# --- in containers on the lab --------------------------------------------------------------------


def run_with_npus(lab, index: int, script: str, npus: str = "3") -> str:
    """stdout and stderr of `sh -c script` in a container given NPUs on node `index`, started
    through the node's default runtime (the shim), as the real runtime would."""
    return (
        lab.client(index)
        .containers.run(
            swarmlab.IMAGE,
            ["sh", "-c", script],
            environment={"ASCEND_VISIBLE_DEVICES": npus},
            remove=True,
            stderr=True,
        )
        .decode()
    )


@pytest.mark.lab
def test_npu_smi_and_hccn_tool_in_containers_show_their_nodes_state(swarm_lab):
    """A test sets NPU 3 of node 2 alarmed and its RoCE link down: a container on node 2 reads
    that through the tools' real paths; one on node 3 reads its own defaults, and its ping
    reaches node 2's NPU 2 but not the NPU whose link is down."""
    swarm_lab.set_npu_state(2, {3: {"health": "Alarm", "error_codes": [0x80E18402]}})
    swarm_lab.set_roce_state(2, {3: {"link": "DOWN"}})
    script = (
        f"{NPU_SMI_PATH} info -t health -i 3; {NPU_SMI_PATH} info -t health -i 3 -c 0; "
        f"{HCCN_TOOL_PATH} -i 3 -link -g; {HCCN_TOOL_PATH} -i 3 -net_health -g; "
        f"{HCCN_TOOL_PATH} -i 3 -ip -g"
    )
    pings = (
        f"{HCCN_TOOL_PATH} -i 3 -ping -g address 192.168.103.2 2>&1; echo rc=$?; "
        f"{HCCN_TOOL_PATH} -i 3 -ping -g address 192.168.102.2 2>&1; echo rc=$?"
    )
    try:
        on_2 = run_with_npus(swarm_lab, 2, script)
        on_3 = run_with_npus(swarm_lab, 3, f"{script}; {pings}")
    finally:
        swarm_lab.set_npu_state(2, {})
        swarm_lab.set_roce_state(2, {})
    assert "\tHealth                         : Alarm\n" in on_2, on_2
    assert "\tHealth Status                  : Alarm\n" in on_2, on_2
    assert "\tError Code                     : 80E18402\n" in on_2, on_2
    assert "link status: DOWN\nnet health status: Fault\n" in on_2, on_2
    assert "ipaddr:192.168.103.2\nnetmask:255.255.255.0\n" in on_2, on_2

    assert "\tHealth                         : OK\n" in on_3, on_3
    assert "\tError Code                     : NA\n" in on_3, on_3
    assert "link status: UP\nnet health status: Success\nipaddr:192.168.103.3\n" in on_3, on_3
    assert "100.00% packet loss\nCommand execute failed!\nrc=1\n" in on_3, on_3
    assert "device 3 PING 192.168.102.2\n" in on_3 and on_3.endswith(
        "3 packets transmitted, 3 received, 0.00% packet loss\nrc=0\n"
    ), on_3


@pytest.mark.lab
def test_a_container_without_npus_has_neither_tool(swarm_lab):
    output = (
        swarm_lab.client(3)
        .containers.run(
            swarmlab.IMAGE,
            ["sh", "-c", f"ls {NPU_SMI_PATH} {HCCN_TOOL_PATH} 2>&1; true"],
            remove=True,
        )
        .decode()
    )
    assert output.count("No such file or directory") == 2, output

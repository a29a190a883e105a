"""The scenario registry, shared by the pytest suite (hil_tests/test_scenarios.py) and
`twinedge hil run`. Each scenario drives a started rig and returns its Figures; checks
specific to the scenario land in `Figures.problems` (so the report shows them), and the
end-to-end accounting is always done.

Time acceleration: emulated nodes run at SPEED with the firmware's default 60 s interval,
so one sample every 60/48 = 1.25 s of wall time. Readings carry wall-clock seconds and
InfluxDB keeps one point per second, so samples must stay more than 1 s apart in wall time.
A fault "N minutes long" lasts N*60/SPEED wall seconds and spans N samples.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hil_tests.rig.accounting import Figures
from hil_tests.rig.rig import Rig

SPEED = 48.0
INTERVAL_S = 60
BASE_CFG: dict[str, Any] = {"v": 1, "interval_s": INTERVAL_S, "batch": 2, "keepalive_s": 10}
RIG_WDT_S = 5.0  # rig watchdog timeout for emulated boards (the firmware arms 30 s); feeding is every 1 s


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    run: Callable[[Rig], Figures]
    needs: frozenset[str] = frozenset({"network"})
    nodes: int = 1  # 0: the --nodes count (default 4)
    board: dict[str, Any] = field(default_factory=dict)  # world / cfg / ring for the board fixture
    long: bool = False


SCENARIOS: dict[str, Scenario] = {}


def scenario(name: str, title: str, needs: set[str] | None = None, nodes: int = 1, long: bool = False,
             **board: Any) -> Callable[[Callable[[Rig], Figures]], Callable[[Rig], Figures]]:
    def deco(fn: Callable[[Rig], Figures]) -> Callable[[Rig], Figures]:
        SCENARIOS[name] = Scenario(name, title, fn, frozenset(needs or {"network"}), nodes, board, long)
        return fn
    return deco


def check(f: Figures, ok: Any, problem: str) -> None:
    if not ok:
        f.problems.append(problem)
        f.verdict = "fail"


def _outage_note(rig: Rig, what: str, node_s: float, taken: int) -> str:
    return (f"{what}: {node_s / 60:g} node-min = {rig.wall(node_s):.2f} s wall at speed {rig.speed:g}, "
            f"{taken} samples taken during it")


# -- scenarios ------------------------------------------------------------------------------
@scenario("steady", "Steady state: every sample lands once, right values and tags")
def steady(rig: Rig) -> Figures:
    rig.wait_online()
    for n in rig.nodes:
        rig.wait_samples(8 if rig.backend == "emulated" else 4, n)
    st = rig.status()
    f = rig.account("steady")
    check(f, st.get("faults") == {}, f"status faults {st.get('faults')}")
    check(f, st.get("drop") == 0, f"status drop {st.get('drop')}")
    return f


@scenario("broker_outage", "Broker down 5 min: node buffers, nothing lost", needs={"network", "services"})
def broker_outage(rig: Rig) -> Figures:
    rig.wait_online()
    rig.wait_samples(2)
    city = rig.city()
    city.broker.stop()
    before = rig.samples_taken()
    rig.mark("fault_start")
    rig.hold(300)
    during = rig.samples_taken() - before
    city.broker.start()
    end = rig.mark("fault_end")
    rig.wait_samples(2)
    f = rig.account("broker_outage", fault_end=end)
    f.notes.append(_outage_note(rig, "broker outage", 300, during))
    check(f, during >= 300 // rig.interval_s - 1, f"only {during} samples during the outage: sampling must not wait")
    return f


@scenario("wifi_loss", "Wi-Fi gone 10 min: node buffers, reconnects, nothing lost", needs={"network", "wifi"})
def wifi_loss(rig: Rig) -> Figures:
    rig.wait_online()
    rig.wait_samples(2)
    node = rig.node
    node.wifi(False)
    t0 = rig.mark("fault_start")
    before = rig.samples_taken()
    rig.hold(600)
    during = rig.samples_taken() - before
    node.wifi(True)
    end = rig.mark("fault_end")
    rig.wait_samples(2)
    f = rig.account("wifi_loss", fault_end=end)
    f.notes.append(_outage_note(rig, "Wi-Fi loss", 600, during))
    downs = [e for e in node.events("down") if e.wall >= t0]
    check(f, downs, "the node never noticed the link was down")
    check(f, during >= 600 // rig.interval_s - 1, f"only {during} samples while Wi-Fi was off")
    return f


@scenario("blackhole", "Silent black-hole (PUBACKs vanish) detected within 1.5 x keepalive",
          needs={"network"})
def blackhole(rig: Rig) -> Figures:
    rig.wait_online()
    rig.wait_samples(2)
    proxy = rig.city().proxy
    keepalive = int(BASE_CFG["keepalive_s"])
    conns = len(proxy.stats.connected_at)
    proxy.blackhole("down")  # publishes still reach the broker, nothing comes back: duplicates follow
    t0 = rig.mark("fault_start")
    rig.wait(lambda: len(proxy.stats.connected_at) > conns, keepalive * 3, "the node to give up the dead link", rig.node)
    detected = proxy.stats.connected_at[conns] - t0  # the node reconnects at once after declaring it dead
    proxy.passthrough()
    end = rig.mark("fault_end")
    rig.wait_samples(2)
    f = rig.account("blackhole", fault_end=end)
    f.notes.append(f"black-hole detected after {detected:.2f} s = {detected / keepalive:.2f} x keepalive {keepalive} s "
                   "(keepalive is real time, not accelerated)")
    check(f, detected <= 1.5 * keepalive, f"black-hole detected after {detected:.1f} s > 1.5 x keepalive {keepalive} s")
    return f


@scenario("power_cycle", "Power cut mid-batch (batch in flight, PUBACK lost): nothing lost, nothing doubled",
          needs={"network", "power"}, cfg={"batch": 4})
def power_cycle(rig: Rig) -> Figures:
    rig.wait_online()
    rig.wait_samples(5)
    proxy = rig.city().proxy
    proxy.blackhole("down")  # the next batch reaches the gateway but its PUBACK never returns
    top = rig.wait_samples(5)
    node = rig.node
    node.power_cycle("power_on")
    proxy.passthrough()
    end = rig.mark("fault_end")
    st = rig.wait_status(lambda s: s.get("reset") == "power_on" and s.get("seq", 0) > top and s.get("up_s", 99) < 30,
                         60, "status after the power cycle", node)
    rig.wait_samples(3)
    f = rig.account("power_cycle", fault_end=end)
    check(f, st.get("drop") == 0, f"status drop {st.get('drop')} after the power cycle")
    check(f, node.boots == 2, f"{node.boots} boots, expected 2")
    f.notes.append(f"power cut with samples up to seq {top} taken; the gateway skipped {f.redelivered} redelivered readings")
    return f


@scenario("influx_outage", "InfluxDB down 5 min: gateway log holds, nothing lost", needs={"network", "services"})
def influx_outage(rig: Rig) -> Figures:
    rig.wait_online()
    rig.wait_samples(2)
    influx = rig.stack.influx
    assert influx is not None
    influx.stop()
    before = rig.samples_taken()
    rig.hold(300)
    during = rig.samples_taken() - before
    influx.start()
    end = rig.mark("fault_end")
    rig.wait_samples(2)
    f = rig.account("influx_outage", fault_end=end)
    f.notes.append(_outage_note(rig, "InfluxDB outage", 300, during))
    return f


@scenario("gateway_kill", "Gateway SIGKILL, 5 min down, restart: nothing lost, nothing doubled",
          needs={"network", "services"})
def gateway_kill(rig: Rig) -> Figures:
    rig.wait_online()
    rig.wait_samples(2)
    gw = rig.city().gateway
    gw.kill()
    before = rig.samples_taken()
    rig.hold(300)
    during = rig.samples_taken() - before
    gw.start()
    end = rig.mark("fault_end")
    rig.wait_samples(2)
    f = rig.account("gateway_kill", fault_end=end)
    f.notes.append(_outage_note(rig, "gateway down after SIGKILL", 300, during))
    return f


@scenario("config_push", "Config push applied (calibration in the values); invalid config rejected, old kept",
          needs={"network", "config"})
def config_push(rig: Rig) -> Figures:
    rig.wait_online()
    rig.wait_samples(2)
    node = rig.node
    base = node.cfg_docs[max(node.cfg_docs)]
    ivl = int(base.get("interval_s", INTERVAL_S) * 3 // 2)  # longer, never shorter: samples stay > 1 s apart
    v = max(node.cfg_docs) + 1
    good = {**base, "v": v, "interval_s": ivl,
            "cal": {"ph": {"points": [[4.0, 4.1], [7.0, 7.1], [10.0, 10.2]]}, "water_temp_c": {"gain": 1.0, "offset": -0.1},
                    "battery_v": {"gain": 1.01, "offset": 0.0}}}
    rig.push_config(good)
    st = rig.wait_status(lambda s: s.get("cfg") == v, 30, f"config v{v} acknowledged", node)
    f_problems = []
    if st.get("cfg_err") is not None:
        f_problems.append(f"cfg_err {st['cfg_err']} after a valid config")
    rig.wait_samples(3)
    bad = {"v": v + 1, "interval_s": 0}
    rig.push_config(bad)
    st = rig.wait_status(lambda s: (s.get("cfg_err") or {}).get("v") == v + 1, 30, f"rejection of v{v + 1}", node)
    rig.push_config(b"{not json")
    st2 = rig.wait_status(lambda s: (s.get("cfg_err") or {}).get("reason") == "config is not valid JSON", 30,
                          "rejection of broken JSON", node)
    rig.wait_samples(2)
    f = rig.account("config_push")
    f.problems += f_problems
    check(f, st.get("cfg") == v and "interval_s=0" in st["cfg_err"].get("reason", ""),
          f"invalid config: status {st.get('cfg')} {st.get('cfg_err')}")
    check(f, st2.get("cfg") == v, f"after broken JSON the node runs cfg {st2.get('cfg')}, want {v}")
    if rig.backend == "emulated":
        kept = json.loads((node.flash / "cfg.json").read_text())
        check(f, kept.get("v") == v, f"cfg.json on flash is v{kept.get('v')}, want v{v}")
    f.notes.append(f"config v{v} (interval {ivl} s, 3-point pH, temperature offset) applied; v{v + 1} "
                   "(interval_s=0) and broken JSON rejected, v" + str(v) + " kept")
    return f


@scenario("sensor_fault", "Unplugged / stalled sensors and a flat battery: faults reported, no invented values",
          needs={"network", "stimulus"})
def sensor_fault(rig: Rig) -> Figures:
    rig.wait_online()
    rig.wait_samples(2)
    node = rig.node
    node.unplug("ph", "turb")
    node.stall("do")
    node.drain_battery(2.3)
    want = {"ph": "missing", "turbidity_ntu": "missing", "do_mgl": "timeout", "battery_v": "range"}
    rig.wait_status(lambda s: s.get("faults") == want, 30, f"faults {want} in status", node)
    rig.wait_samples(3)
    node.replug()
    node.drain_battery(3.7)
    rig.wait_status(lambda s: s.get("faults") == {}, 30, "faults cleared", node)
    rig.wait_samples(2)
    f = rig.account("sensor_fault")
    faulted = [s for s in node.ring().samples.values() if "ph" not in s.values]
    check(f, len(faulted) >= 3, f"only {len(faulted)} samples taken with the probes unplugged")
    f.notes.append(f"{len(faulted)} samples without pH/turbidity/DO/battery; InfluxDB has those fields absent")
    return f


@scenario("boot_unsynced", "Boot without time sync: readings flagged, re-timed on sync, then clean",
          needs={"network", "clock"}, world={"ntp": False, "rtc_offset_s": -3600})
def boot_unsynced(rig: Rig) -> Figures:
    rig.wait_online()
    node = rig.node
    rig.wait_samples(3)
    st0 = rig.status()
    node.ntp(True)
    rig.operator().command(node.spec, {"cmd": "sync_time"})
    rig.wait_status(lambda s: s.get("synced"), 30, "clock synced", node)
    sync_seq = node.top_seq()
    rig.wait_samples(3)
    f = rig.account("boot_unsynced")
    check(f, st0.get("synced") is False, f"status before sync says synced={st0.get('synced')}")
    ring = node.ring().samples
    walls = node.sample_walls()
    early = [s for s in ring.values() if s.seq <= 2]
    late = [s for s in ring.values() if s.seq > sync_seq + 1]
    check(f, early and all(s.flags & 1 for s in early), "readings before the sync are not flagged unsynced")
    check(f, late and all(not s.flags & 1 and abs(s.t - walls[s.seq]) < 5 for s in late if s.seq in walls),
          "readings after the sync are flagged or off the wall clock")
    f.notes.append("RTC 1 h behind and NTP unreachable at power-on; sync by command")
    return f


@scenario("buffer_full", "Flash ring full during an outage: oldest dropped, counted, reported, no crash",
          needs={"network", "small_ring"}, ring=8)
def buffer_full(rig: Rig) -> Figures:
    rig.wait_online()
    rig.wait_samples(2)
    proxy = rig.city().proxy
    proxy.refuse()
    before = rig.samples_taken()
    rig.wait_samples(12)
    during = rig.samples_taken() - before
    proxy.passthrough()
    end = rig.mark("fault_end")
    st = rig.wait_status(lambda s: s.get("drop", 0) > 0, 30, "drops reported in status", rig.node)
    rig.wait_samples(2)
    f = rig.account("buffer_full", fault_end=end, allow_drops=True)
    ring = rig.node.ring()
    check(f, st["drop"] == ring.drop, f"status drop {st['drop']} but ring.meta says {ring.drop}")
    check(f, f.dropped == f.taken - f.landed, f"dropped {f.dropped} != taken {f.taken} - landed {f.landed}")
    check(f, during - ring.cap <= f.dropped <= during, f"{f.dropped} dropped for {during} samples into a ring of {ring.cap}")
    if hasattr(rig.node, "boots"):
        check(f, rig.node.boots == 1, f"the node rebooted ({rig.node.boots} boots)")
    f.notes.append(f"ring of {ring.cap} readings, {during} samples during a broker refusal: {f.dropped} dropped")
    return f


@scenario("watchdog", "Firmware hang (locked bus): watchdog resets the node, sampling resumes",
          needs={"network", "watchdog"})
def watchdog(rig: Rig) -> Figures:
    rig.wait_online()
    rig.wait_samples(3)
    node = rig.node
    node.hang_bus()
    t0 = rig.mark("fault_start")
    rig.wait(lambda: node.wdt_resets, 30, "the watchdog to reset the hung node", node)
    took = node.wdt_resets[0] - t0
    end = rig.mark("fault_end")
    rig.wait_status(lambda s: s.get("reset") == "wdt", 30, "status with reset=wdt", node)
    rig.wait_samples(3)
    f = rig.account("watchdog", fault_end=end)
    check(f, len(node.wdt_resets) == 1, f"{len(node.wdt_resets)} watchdog resets, want 1")
    timeout = node.wdt_timeout_s or 30
    check(f, timeout <= took <= timeout + 3, f"reset {took:.1f} s after the hang (timeout {timeout} s)")
    f.notes.append(f"hung at {t0:.0f}, reset after {took:.1f} s (rig watchdog {timeout:g} s; firmware arms 30 s)")
    return f


@scenario("fleet", "Several nodes in two cities at once: each city gets its own, complete", nodes=0)
def fleet(rig: Rig) -> Figures:
    rig.wait_online()
    for n in rig.nodes:
        rig.wait_samples(5, n)
    f = rig.account("fleet")
    for name in rig.stack.cities:
        mine = {n.spec.node for n in rig.nodes if n.spec.city == name}
        seen = {str(p.get("node")) for p in rig.stack.points(name) or []}
        check(f, seen == mine, f"{name} InfluxDB has nodes {sorted(seen)}, want {sorted(mine)}")
    f.notes.append(f"{len(rig.nodes)} nodes in {len(rig.stack.cities)} cities")
    return f


@scenario("long_outage", "Broker down 1 h (60 samples buffered), then a 1 h catch-up check", needs={"network", "services"},
          long=True)
def long_outage(rig: Rig) -> Figures:
    rig.wait_online()
    rig.wait_samples(2)
    city = rig.city()
    city.broker.stop()
    before = rig.samples_taken()
    rig.hold(3600)
    during = rig.samples_taken() - before
    city.broker.start()
    end = rig.mark("fault_end")
    rig.wait_samples(5)
    f = rig.account("long_outage", fault_end=end)
    f.notes.append(_outage_note(rig, "broker outage", 3600, during))
    return f

#!/usr/bin/env python3
"""Compares what metricsd's NVML collector reports with what nvidia-smi prints, on a machine
with NVIDIA GPUs and their driver (issue 4's real-GPU check). Prints Markdown for
docs/BENCHMARKS.md and keeps the raw outputs.

    bash scripts/gpu-kit.sh                    # here: stripped metricsd + nvml/prometheus plugins
    python3 scripts/gpu-compare.py --bin gpu-kit --out /tmp/gpu-compare   # on the GPU machine

metricsd runs with the NVML collector (the system's libnvidia-ml.so.1, or --library-path) and
the Prometheus sink at a 1 s interval for --seconds; then /metrics is scraped and nvidia-smi
queried at once, so momentary values (power, clocks, utilization, temperature) may move a
little between the two: those rows have a tolerance, the rest must be equal. The collection
cost per cycle is read from the agent's own counters and /proc.
"""

import argparse
import csv
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

SERIES = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
NA = ("[N/A]", "N/A", "[Not Supported]", "Not Supported", "[Unknown Error]", "")

ON_OFF = {"enabled": 1, "disabled": 0, "active": 1, "not active": 0, "yes": 1, "no": 0,
          "true": 1, "false": 0, "1": 1, "0": 0}
MIB = 1024 * 1024

# nvidia-smi --query-gpu field -> (metricsd series, extra labels, scale to nvidia-smi's unit,
# tolerance: None = equal, ("abs", x) or ("rel", fraction), or "onoff" / "pstate" / "label").
FIELDS = [
    ("name", ("gpu_info", {}, None, "label:name")),
    ("uuid", ("gpu_info", {}, None, "label:uuid")),
    ("pci.bus_id", ("gpu_info", {}, None, "label:pci_bus_id")),
    ("driver_version", ("gpu_info", {}, None, "label:driver_version")),
    ("vbios_version", ("gpu_info", {}, None, "label:vbios_version")),
    ("serial", ("gpu_info", {}, None, "label:serial")),
    ("count", ("gpu_count", None, 1, None)),
    ("temperature.gpu", ("gpu_temperature_celsius", {}, 1, ("abs", 2))),
    ("temperature.memory", ("gpu_memory_temperature_celsius", {}, 1, ("abs", 2))),
    ("utilization.gpu", ("gpu_utilization_ratio", {}, 100, ("abs", 10))),
    ("utilization.memory", ("gpu_memory_utilization_ratio", {}, 100, ("abs", 10))),
    ("utilization.encoder", ("gpu_encoder_utilization_ratio", {}, 100, ("abs", 10))),
    ("utilization.decoder", ("gpu_decoder_utilization_ratio", {}, 100, ("abs", 10))),
    ("memory.total", ("gpu_memory_total_bytes", {}, 1 / MIB, ("abs", 1))),
    ("memory.reserved", ("gpu_memory_reserved_bytes", {}, 1 / MIB, ("abs", 1))),
    ("memory.used", ("gpu_memory_used_bytes", {}, 1 / MIB, ("rel", 0.02))),
    ("memory.free", ("gpu_memory_free_bytes", {}, 1 / MIB, ("rel", 0.02))),
    ("power.draw", ("gpu_power_usage_watts", {}, 1, ("rel", 0.15))),
    ("power.limit", ("gpu_power_management_limit_watts", {}, 1, ("abs", 0.5))),
    ("enforced.power.limit", ("gpu_power_limit_watts", {}, 1, ("abs", 0.5))),
    ("power.default_limit", ("gpu_power_default_limit_watts", {}, 1, ("abs", 0.5))),
    ("clocks.gr", ("gpu_clock_hertz", {"clock": "graphics"}, 1e-6, ("rel", 0.15))),
    ("clocks.sm", ("gpu_clock_hertz", {"clock": "sm"}, 1e-6, ("rel", 0.15))),
    ("clocks.mem", ("gpu_clock_hertz", {"clock": "memory"}, 1e-6, ("rel", 0.15))),
    ("clocks.video", ("gpu_clock_hertz", {"clock": "video"}, 1e-6, ("rel", 0.15))),
    ("clocks.max.gr", ("gpu_clock_max_hertz", {"clock": "graphics"}, 1e-6, None)),
    ("clocks.max.sm", ("gpu_clock_max_hertz", {"clock": "sm"}, 1e-6, None)),
    ("clocks.max.mem", ("gpu_clock_max_hertz", {"clock": "memory"}, 1e-6, None)),
    ("pstate", ("gpu_performance_state", {}, 1, "pstate")),
    ("pcie.link.gen.current", ("gpu_pcie_link_generation", {}, 1, None)),
    ("pcie.link.gen.max", ("gpu_pcie_link_max_generation", {}, 1, None)),
    ("pcie.link.width.current", ("gpu_pcie_link_width", {}, 1, None)),
    ("pcie.link.width.max", ("gpu_pcie_link_max_width", {}, 1, None)),
    ("fan.speed", ("gpu_fan_speed_ratio", {}, 100, ("abs", 5))),
    ("ecc.mode.current", ("gpu_ecc_enabled", {}, 1, "onoff")),
    ("ecc.errors.corrected.volatile.total",
     ("gpu_ecc_errors_total", {"type": "corrected", "scope": "volatile"}, 1, None)),
    ("ecc.errors.uncorrected.volatile.total",
     ("gpu_ecc_errors_total", {"type": "uncorrected", "scope": "volatile"}, 1, None)),
    ("ecc.errors.corrected.aggregate.total",
     ("gpu_ecc_errors_total", {"type": "corrected", "scope": "aggregate"}, 1, None)),
    ("ecc.errors.uncorrected.aggregate.total",
     ("gpu_ecc_errors_total", {"type": "uncorrected", "scope": "aggregate"}, 1, None)),
    ("retired_pages.pending", ("gpu_retired_pages_pending", {}, 1, "onoff")),
    ("retired_pages.single_bit_ecc.count",
     ("gpu_retired_pages_total", {"cause": "multiple_single_bit_ecc"}, 1, None)),
    ("retired_pages.double_bit.count",
     ("gpu_retired_pages_total", {"cause": "double_bit_ecc"}, 1, None)),
    ("remapped_rows.correctable", ("gpu_remapped_rows_total", {"type": "correctable"}, 1, None)),
    ("remapped_rows.uncorrectable",
     ("gpu_remapped_rows_total", {"type": "uncorrectable"}, 1, None)),
    ("remapped_rows.pending", ("gpu_remapped_rows_pending", {}, 1, "onoff")),
    ("remapped_rows.failure", ("gpu_row_remap_failure", {}, 1, "onoff")),
    ("mig.mode.current", ("gpu_mig_mode_enabled", {}, 1, "onoff")),
    ("mig.mode.pending", ("gpu_mig_mode_pending", {}, 1, "onoff")),
]
REASONS = ["gpu_idle", "applications_clocks_setting", "sw_power_cap", "hw_slowdown",
           "sync_boost", "sw_thermal_slowdown", "hw_thermal_slowdown", "hw_power_brake_slowdown"]
# Every comparable field; the clock event reasons under both names drivers have used for them.
RULES = dict(FIELDS) | {
    f"{prefix}.{r}": ("gpu_clocks_event_active", {"reason": r}, 1, "onoff")
    for prefix in ("clocks_event_reasons", "clocks_throttle_reasons") for r in REASONS
}


def parse_exposition(text):
    """[(name, labels, value)] of a text-format exposition."""
    out = []
    for line in text.splitlines():
        match = SERIES.match(line)
        if not match or line.startswith("#"):
            continue
        labels = {k: v.replace('\\"', '"').replace("\\\\", "\\")
                  for k, v in LABEL.findall(match.group(2) or "")}
        try:
            out.append((match.group(1), labels, float(match.group(3))))
        except ValueError:
            pass
    return out


def find(series, name, gpu, extra):
    """The value (and labels) of `name` for GPU index `gpu` (None: no gpu label) with `extra`
    labels, or None."""
    for n, labels, value in series:
        if n != name:
            continue
        if gpu is not None and labels.get("gpu") != gpu:
            continue
        if extra and any(labels.get(k) != v for k, v in extra.items()):
            continue
        return value, labels
    return None


def number(text):
    match = re.match(r"^\s*(-?[0-9.]+)", text)
    return float(match.group(1)) if match else None


def verdict(smi, found, scale, rule):
    """(nvidia-smi as printed, metricsd as compared, verdict)."""
    smi_absent = smi.strip() in NA
    if found is None:
        return smi, "absent", "both absent" if smi_absent else "**missing in metricsd**"
    value, labels = found
    if isinstance(rule, str) and rule.startswith("label:"):
        got = labels.get(rule[6:], "")
        if smi_absent:
            return smi, got or "(empty)", "both absent" if not got else "**differs**"
        same = got.lower() == smi.strip().lower()
        return smi, got, "equal" if same else "**differs**"
    if smi_absent:
        return smi, f"{value:g}", "**nvidia-smi has none**"
    if rule == "onoff":
        want = ON_OFF.get(smi.strip().lower())
        return smi, f"{value:g}", "equal" if want == value else "**differs**"
    if rule == "pstate":
        want = number(smi.strip().lstrip("P"))
        return smi, f"P{value:g}", "equal" if want == value else "**differs**"
    want = number(smi)
    got = value * scale
    shown = f"{got:.6g}"
    if want is None:
        return smi, shown, "**unparsed**"
    if rule is None:
        return smi, shown, "equal" if abs(got - want) < 1e-6 * max(1, abs(want)) else "**differs**"
    kind, tol = rule
    limit = tol if kind == "abs" else tol * max(abs(want), 1e-9)
    if abs(got - want) <= limit:
        if abs(got - want) < 1e-9:
            return smi, shown, "equal"
        return smi, shown, f"within ±{tol:g}" if kind == "abs" else f"within {tol * 100:g} %"
    return smi, shown, "**differs**"


def run(cmd):
    started = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    return done, time.monotonic() - started


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url):
    with urllib.request.urlopen(url, timeout=10) as answer:
        return answer.read().decode()


def collector_counters(url):
    """(collections, seconds spent collecting) of the `gpu` collector, from one read of the
    agent's own metrics."""
    series = parse_exposition(http(url))
    values = []
    for name in ("metricsd_collector_collections_total",
                 "metricsd_collector_duration_seconds_total"):
        found = find(series, name, None, {"collector": "gpu"})
        values.append(found[0] if found else 0.0)
    return values


def thread_cpu(pid):
    """{thread name: CPU seconds} of a process's threads (schedstat, ns steps)."""
    out = {}
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/comm") as f:
                name = f.read().strip()
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                out[name] = out.get(name, 0) + int(f.read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        pass
    return out


def cpu_seconds(pid):
    """CPU time of all of the process's threads, in ns steps (schedstat), else clock ticks."""
    try:
        total = 0
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        return total / 1e9
    except (OSError, ValueError, IndexError):
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bin", default="target/release", help="metricsd and its plugins")
    parser.add_argument("--library-path", help="libnvidia-ml to load (default: the system's)")
    parser.add_argument("--seconds", type=float, default=30, help="how long metricsd runs")
    parser.add_argument("--interval", default="1s", help="the collection interval")
    parser.add_argument("--nvidia-smi", default="nvidia-smi")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a line for the collector's [collectors.config], e.g. energy=false")
    parser.add_argument("--out", help="a directory for the raw outputs")
    args = parser.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="gpu-compare-")
    os.makedirs(out, exist_ok=True)
    smi = shutil.which(args.nvidia_smi)
    if smi is None:
        sys.exit(f"{args.nvidia_smi} not found: this check needs a machine with the NVIDIA driver")

    port = free_port()
    health = free_port()
    config = os.path.join(out, "metricsd.toml")
    nvml_config = f'library_path = "{args.library_path}"\n' if args.library_path else ""
    nvml_config += "".join(f"{line}\n" for line in args.set)
    with open(config, "w") as f:
        f.write(f"""[agent]
interval = "{args.interval}"
[http]
metrics_listen = "127.0.0.1:{port}"
health_listen = "127.0.0.1:{health}"
[[collectors]]
name = "gpu"
plugin = "nvml"
[collectors.config]
{nvml_config}[[sinks]]
name = "prometheus"
plugin = "prometheus"
""")
    log = open(os.path.join(out, "metricsd.log"), "w")
    agent = subprocess.Popen([os.path.join(args.bin, "metricsd"), "-c", config, "run"],
                             stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            if agent.poll() is not None:
                sys.exit(f"metricsd exited ({agent.returncode}); see {out}/metricsd.log")
            try:
                if "gpu_up{" in http(f"http://127.0.0.1:{port}/metrics"):
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                sys.exit(f"no gpu_up series within 30 s; see {out}/metricsd.log")
            time.sleep(0.2)
        stats = f"http://127.0.0.1:{health}/metrics/stats"
        threads0 = thread_cpu(agent.pid)
        cpu0, (calls0, busy0) = cpu_seconds(agent.pid), collector_counters(stats)
        time.sleep(args.seconds)
        cpu1, (calls1, busy1) = cpu_seconds(agent.pid), collector_counters(stats)
        threads1 = thread_cpu(agent.pid)
        rss_kib = rss(agent.pid)
        body = http(f"http://127.0.0.1:{port}/metrics")
        apps = run([smi, "--query-compute-apps=gpu_uuid,pid,process_name,used_memory",
                    "--format=csv,noheader,nounits"])[0]
        help_text = run([smi, "--help-query-gpu"])[0].stdout
        # Drivers before R535 call the clock event reasons "clocks_throttle_reasons".
        prefix = ("clocks_event_reasons" if '"clocks_event_reasons.gpu_idle"' in help_text
                  else "clocks_throttle_reasons")
        fields = [f for f in RULES if f'"{f}"' in help_text
                  and (not f.startswith("clocks_") or f.startswith(prefix))]
        query, smi_seconds = run([smi, f"--query-gpu=index,{','.join(fields)}",
                                  "--format=csv,noheader,nounits"])
    finally:
        agent.terminate()
        agent.wait(timeout=15)
        log.close()
    with open(os.path.join(out, "metrics.txt"), "w") as f:
        f.write(body)
    with open(os.path.join(out, "nvidia-smi-query.csv"), "w") as f:
        f.write(",".join(["index"] + fields) + "\n" + query.stdout + query.stderr)
    extras = {}
    for name, cmd in [("nvidia-smi-q", [smi, "-q"]), ("nvlink-status", [smi, "nvlink", "-s"]),
                      ("nvlink-errors", [smi, "nvlink", "-e"])]:
        done = run(cmd)[0]
        extras[name] = done.stdout + done.stderr
        with open(os.path.join(out, name + ".txt"), "w") as f:
            f.write(extras[name])
    if query.returncode != 0:
        sys.exit(f"nvidia-smi failed: {query.stderr.strip()} (raw outputs in {out})")

    series = parse_exposition(body)
    rows = list(csv.reader(query.stdout.strip().splitlines(), skipinitialspace=True))
    info = find(series, "gpu_info", None, {})
    driver = info[1].get("driver_version", "?") if info else "?"
    print(f"nvidia-smi: {len(rows)} GPU(s); driver {driver}; raw outputs in {out}\n")
    print("| GPU | nvidia-smi field | nvidia-smi | metricsd series | metricsd | verdict |")
    print("|---|---|---|---|---|---|")
    counts = {}
    for values in rows:
        gpu = values[0].strip()
        for field, smi_value in zip(fields, values[1:]):
            if field == "count" and gpu != "0":
                continue
            name, extra, scale, tolerance = RULES[field]
            found = find(series, name, None if extra is None else gpu, extra or {})
            shown_smi, shown, result = verdict(smi_value, found, scale, tolerance)
            kind = result.strip("*")
            kind = "within tolerance" if kind.startswith("within") else kind
            counts[kind] = counts.get(kind, 0) + 1
            labels = ",".join(f'{k}="{v}"' for k, v in (extra or {}).items())
            selector = f"{name}{{{labels}}}" if labels else name
            print(f"| {gpu} | `{field}` | {shown_smi} | `{selector}` | {shown} | {result} |")
    print()
    print("Verdicts: " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
    print()
    thresholds(series, extras["nvidia-smi-q"])
    processes(series, apps.stdout if apps.returncode == 0 else "")
    nvlink(series, extras["nvlink-status"], extras["nvlink-errors"])
    gpm(series)
    cycles = max(calls1 - calls0, 1)
    gpus = max(int((find(series, "gpu_count", None, {}) or (1, {}))[0]), 1)
    print("| cost | value |")
    print("|---|---|")
    print(f"| metricsd CPU per {args.interval} cycle (whole agent, time inside NVML and the driver "
          f"included) | "
          f"{(cpu1 - cpu0) / cycles * 1000:.2f} ms over {cycles:.0f} cycles |")
    print(f"| per GPU | {(cpu1 - cpu0) / cycles / gpus * 1e6:.0f} µs ({gpus} GPU(s)) |")
    by_thread = sorted(((threads1[n] - threads0.get(n, 0), n) for n in threads1), reverse=True)
    print("| by thread, per cycle | " + ", ".join(
        f"{n} {d / cycles * 1000:.2f} ms" for d, n in by_thread if d / cycles >= 1e-5) + " |")
    print(f"| wall time of one collection (`metricsd_collector_duration_seconds_total`) | "
          f"{(busy1 - busy0) / cycles * 1000:.2f} ms |")
    print(f"| metricsd RSS after {args.seconds:g} s (libnvidia-ml mapped in) | {rss_kib / 1024:.1f} MiB |")
    print(f"| one `nvidia-smi --query-gpu` of the fields above (wall) | {smi_seconds * 1000:.0f} ms |")


def rss(pid):
    """VmRSS of a process in KiB (0 if unreadable)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def processes(series, apps_csv):
    """Compute processes from `nvidia-smi --query-compute-apps` against gpu_process_memory_used_bytes
    (matched by GPU uuid and pid)."""
    rows = list(csv.reader(apps_csv.strip().splitlines(), skipinitialspace=True))
    ours = [(labels, v) for n, labels, v in series if n == "gpu_process_memory_used_bytes"]
    if not rows and not ours:
        print("Compute processes: none on either side\n")
        return
    print("| GPU uuid | pid | nvidia-smi process, MiB | metricsd process, MiB | verdict |")
    print("|---|---|---|---|---|")
    seen = set()
    for row in rows:
        if len(row) < 4:
            continue
        uuid, pid, name, used = (c.strip() for c in row[:4])
        match = next(((l, v) for l, v in ours if l.get("uuid") == uuid and l.get("pid") == pid),
                     None)
        if match is None:
            print(f"| {uuid} | {pid} | {name}, {used} | absent | **missing in metricsd** |")
            continue
        seen.add((uuid, pid))
        labels, value = match
        mib = value / MIB
        want = number(used)
        same = want is not None and abs(mib - want) <= max(0.02 * want, 2)
        print(f"| {uuid} | {pid} | {name}, {used} | {labels.get('process', '')}, {mib:.0f} | "
              f"{'equal' if same else '**differs**'} |")
    for labels, value in ours:
        if (labels.get("uuid"), labels.get("pid")) not in seen:
            print(f"| {labels.get('uuid')} | {labels.get('pid')} | absent | "
                  f"{labels.get('process', '')}, {value / MIB:.0f} | **not in nvidia-smi** |")
    print()


def thresholds(series, q_text):
    """Slowdown and shutdown temperatures from `nvidia-smi -q`, by PCI bus id. Drivers from
    R570 on print them on Hopper as margins to the "T.Limit" temperature (`GPU T.Limit Temp`,
    the current margin, and `GPU Shutdown T.Limit Temp`, the margin at which it shuts down):
    then the absolute threshold is current + current margin - threshold margin."""
    rows = []
    for block in re.split(r"^GPU (?=[0-9A-Fa-f]{4,8}:)", q_text, flags=re.M)[1:]:
        bus = block.split()[0].lower()

        def read(label):
            match = re.search(rf"^\s*{re.escape(label)}\s*:\s*(\S+)", block, flags=re.M)
            return match.group(1) if match else "[N/A]"

        for kind, name in [("Shutdown", "gpu_temperature_shutdown_threshold_celsius"),
                           ("Slowdown", "gpu_temperature_slowdown_threshold_celsius")]:
            label, smi, rule = f"GPU {kind} Temp", read(f"GPU {kind} Temp"), None
            current, margin = number(read("GPU Current Temp")), number(read("GPU T.Limit Temp"))
            at = number(read(f"GPU {kind} T.Limit Temp"))
            if smi in NA and None not in (current, margin, at):
                # The two readings of the current temperature may be a degree apart.
                label, smi, rule = (f"GPU {kind} T.Limit Temp {at:g} (current + T.Limit margin {-at:+g})",
                                    f"{current + margin - at:g}", ("abs", 1))
            found = next(((v, l) for n, l, v in series
                          if n == name and l.get("pci_bus_id", "").lower() == bus), None)
            rows.append((bus, label, *verdict(smi, found, 1, rule), name))
    if rows:
        print("| GPU (bus id) | nvidia-smi -q | nvidia-smi | metricsd | verdict | series |")
        print("|---|---|---|---|---|---|")
        for bus, label, smi, got, result, name in rows:
            print(f"| {bus} | {label} | {smi} | {got} | {result} | `{name}` |")
        print()
        if any("T.Limit" in label for _, label, *_ in rows):
            print("The T.Limit margin need not be measured at the sensor of `GPU Current Temp`: "
                  "under load the derived thresholds can be off (on busy H200s they came out "
                  "equal once and 5 °C low once).\n")


def gpm(series):
    """The GPM profiling metrics per GPU: nvidia-smi has no equivalent, so they are listed."""
    names = ["gpu_graphics_engine_active_ratio", "gpu_sm_active_ratio", "gpu_sm_occupancy_ratio",
             "gpu_tensor_active_ratio", "gpu_dram_active_ratio", "gpu_fp64_active_ratio",
             "gpu_fp32_active_ratio", "gpu_fp16_active_ratio"]
    gpus = sorted({labels["gpu"] for n, labels, _ in series if n in names and "gpu" in labels},
                  key=int)
    if not gpus:
        print("GPM metrics (Hopper and newer; no nvidia-smi equivalent): none reported\n")
        return
    print("GPM metrics (no nvidia-smi equivalent):\n")
    print("| GPU | " + " | ".join(n[4:-6] for n in names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for g in gpus:
        cells = []
        for n in names:
            found = find(series, n, g, {})
            cells.append(f"{found[0]:.3f}" if found else "absent")
        print(f"| {g} | " + " | ".join(cells) + " |")
    print()


def link_lines(text):
    """(GPU index, the text after `Link N:`) of `nvidia-smi nvlink` output; None for the GPU's
    own heading line."""
    gpu = None
    for line in text.splitlines():
        head = re.match(r"^GPU (\d+):", line)
        link = re.match(r"^\s*Link \d+:\s*(.*)", line)
        if head:
            gpu = head.group(1)
            yield gpu, None
        elif gpu is not None and link:
            yield gpu, link.group(1)


def nvlink(series, status, errors):
    """Links up and error totals from `nvidia-smi nvlink -s / -e` against metricsd."""
    up = {}
    for gpu, rest in link_lines(status):
        up[gpu] = up.get(gpu, 0) + (rest is not None and "inactive" not in rest.lower())
    totals = {}
    for gpu, rest in link_lines(errors):
        match = re.match(r"(.+?) Errors?:\s*(\d+)", rest or "")
        if match:
            kind = match.group(1).strip().lower().replace(" ", "_")
            totals[(gpu, kind)] = totals.get((gpu, kind), 0) + int(match.group(2))
    if not up and not totals:
        print("NVLink: nvidia-smi reports no links (raw outputs kept)\n")
        return
    print("| GPU | NVLink | nvidia-smi | metricsd |")
    print("|---|---|---|---|")
    for g, n in sorted(up.items()):
        ours = sum(1 for name, labels, v in series
                   if name == "gpu_nvlink_up" and labels.get("gpu") == g and v == 1)
        print(f"| {g} | links up | {n} | {ours} |")
    for (g, kind), n in sorted(totals.items()):
        # nvidia-smi's "CRC" may be metricsd's crc_flit and crc_data: show every type it begins.
        ours = [f"{labels['type']} {v:g}" for name, labels, v in series
                if name == "gpu_nvlink_errors_total" and labels.get("gpu") == g
                and "link" not in labels and labels.get("type", "").startswith(kind)]
        print(f"| {g} | {kind} errors (all links) | {n} | {', '.join(ours) or 'absent'} |")
    print()


if __name__ == "__main__":
    main()

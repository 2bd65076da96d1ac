#!/usr/bin/env python3
"""Times each NVML call the nvml collector makes, one by one, on a machine with the NVIDIA
driver: where a collection cycle's time goes (issue 4's real-GPU check). Uses nvidia-ml-py
(`import pynvml`), which calls the same C functions of libnvidia-ml.so.1 as nvml-wrapper.

    python3 scripts/nvml-call-cost.py [--gpu 0] [--rounds 5] [--interval 1]

Calls are made in rounds an interval apart, as the collector's cycles are, because the driver
answers some calls from a cache for a short while: a call right after another one of its group
is cheap, the first of a cycle pays. Prints Markdown: per call its result and the calling
thread's CPU time (time in the driver's ioctls included) once per round and again at once, then
the CPU per round of the calls a default collection makes.
"""

import argparse
import statistics
import time

import pynvml as N


def calls(h, pid):
    """(NVML function, made every default cycle?, thunk)."""
    reasons = getattr(N, "nvmlDeviceGetCurrentClocksEventReasons",
                      getattr(N, "nvmlDeviceGetCurrentClocksThrottleReasons", None))
    fields = [138, 139, 82, 142, 143, 144, 145, 197, 198]
    gpm = []
    if hasattr(N, "nvmlGpmSampleAlloc"):
        sample = N.nvmlGpmSampleAlloc()
        gpm = [("nvmlGpmSampleGet (GPM thread, every gpm_period)", False,
                lambda: N.nvmlGpmSampleGet(h, sample))]
    out = [
        ("nvmlDeviceGetCount_v2", True, N.nvmlDeviceGetCount),
        ("nvmlDeviceGetHandleByIndex_v2", True, lambda: N.nvmlDeviceGetHandleByIndex(0)),
        ("nvmlDeviceGetUtilizationRates", True, lambda: N.nvmlDeviceGetUtilizationRates(h)),
        ("nvmlDeviceGetMemoryInfo_v2", True,
         lambda: N.nvmlDeviceGetMemoryInfo(h, version=N.nvmlMemory_v2)),
        ("nvmlDeviceGetBAR1MemoryInfo", True, lambda: N.nvmlDeviceGetBAR1MemoryInfo(h)),
        ("nvmlDeviceGetTemperature", True,
         lambda: N.nvmlDeviceGetTemperature(h, N.NVML_TEMPERATURE_GPU)),
        ("nvmlDeviceGetTemperatureThreshold (slowdown)", True,
         lambda: N.nvmlDeviceGetTemperatureThreshold(h, N.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN)),
        ("nvmlDeviceGetTemperatureThreshold (shutdown)", True,
         lambda: N.nvmlDeviceGetTemperatureThreshold(h, N.NVML_TEMPERATURE_THRESHOLD_SHUTDOWN)),
        ("nvmlDeviceGetPowerUsage", True, lambda: N.nvmlDeviceGetPowerUsage(h)),
        ("nvmlDeviceGetPowerManagementLimit", True, lambda: N.nvmlDeviceGetPowerManagementLimit(h)),
        ("nvmlDeviceGetEnforcedPowerLimit", True, lambda: N.nvmlDeviceGetEnforcedPowerLimit(h)),
        ("nvmlDeviceGetPowerManagementDefaultLimit", True,
         lambda: N.nvmlDeviceGetPowerManagementDefaultLimit(h)),
        ("nvmlDeviceGetTotalEnergyConsumption", True,
         lambda: N.nvmlDeviceGetTotalEnergyConsumption(h)),
    ]
    for clock, cname in [(N.NVML_CLOCK_GRAPHICS, "graphics"), (N.NVML_CLOCK_SM, "sm"),
                         (N.NVML_CLOCK_MEM, "memory"), (N.NVML_CLOCK_VIDEO, "video")]:
        out.append((f"nvmlDeviceGetClockInfo ({cname})", True,
                    lambda c=clock: N.nvmlDeviceGetClockInfo(h, c)))
        out.append((f"nvmlDeviceGetMaxClockInfo ({cname})", True,
                    lambda c=clock: N.nvmlDeviceGetMaxClockInfo(h, c)))
    out += [
        ("nvmlDeviceGetPerformanceState", True, lambda: N.nvmlDeviceGetPerformanceState(h)),
        ("nvmlDeviceGetFanSpeed_v2", True, lambda: N.nvmlDeviceGetFanSpeed_v2(h, 0)),
        ("nvmlDeviceGetEncoderUtilization", True, lambda: N.nvmlDeviceGetEncoderUtilization(h)),
        ("nvmlDeviceGetDecoderUtilization", True, lambda: N.nvmlDeviceGetDecoderUtilization(h)),
        ("nvmlDeviceGetCurrPcieLinkGeneration", True,
         lambda: N.nvmlDeviceGetCurrPcieLinkGeneration(h)),
        ("nvmlDeviceGetCurrPcieLinkWidth", True, lambda: N.nvmlDeviceGetCurrPcieLinkWidth(h)),
        ("nvmlDeviceGetMaxPcieLinkGeneration", True,
         lambda: N.nvmlDeviceGetMaxPcieLinkGeneration(h)),
        ("nvmlDeviceGetMaxPcieLinkWidth", True, lambda: N.nvmlDeviceGetMaxPcieLinkWidth(h)),
        ("nvmlDeviceGetPcieReplayCounter", True, lambda: N.nvmlDeviceGetPcieReplayCounter(h)),
        ("nvmlDeviceGetCurrentClocksEventReasons", True, lambda: reasons(h)),
        ("nvmlDeviceGetEccMode", True, lambda: N.nvmlDeviceGetEccMode(h)),
    ]
    for err, ename in [(N.NVML_MEMORY_ERROR_TYPE_CORRECTED, "corrected"),
                       (N.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, "uncorrected")]:
        for counter, cname in [(N.NVML_VOLATILE_ECC, "volatile"),
                               (N.NVML_AGGREGATE_ECC, "aggregate")]:
            out.append((f"nvmlDeviceGetTotalEccErrors ({ename}, {cname})", True,
                        lambda e=err, c=counter: N.nvmlDeviceGetTotalEccErrors(h, e, c)))
    out += [
        ("nvmlDeviceGetRetiredPagesPendingStatus", True,
         lambda: N.nvmlDeviceGetRetiredPagesPendingStatus(h)),
        ("nvmlDeviceGetFieldValues (9 fields)", True, lambda: N.nvmlDeviceGetFieldValues(h, fields)),
    ]
    # 83 total energy, 185/186 power average/instant, 94 PCIe replays, 1 ECC mode,
    # 193/194 shutdown/slowdown T.Limit margins: alternatives to calls above.
    for fid in fields + [83, 185, 186, 94, 1, 193, 194]:
        out.append((f"nvmlDeviceGetFieldValues (field {fid} alone)", False,
                    lambda f=fid: N.nvmlDeviceGetFieldValues(h, [f])))
    out.append(("nvmlDeviceGetFieldValues (9 fields + 83)", False,
                lambda: N.nvmlDeviceGetFieldValues(h, fields + [83])))
    out += [
        ("nvmlDeviceGetMigMode", True, lambda: N.nvmlDeviceGetMigMode(h)),
        ("nvmlDeviceGetNvLinkState (link 0)", True, lambda: N.nvmlDeviceGetNvLinkState(h, 0)),
        ("nvmlDeviceGetComputeRunningProcesses_v3", True,
         lambda: N.nvmlDeviceGetComputeRunningProcesses(h)),
        ("nvmlSystemGetProcessName (per process)", True,
         lambda: N.nvmlSystemGetProcessName(pid) if pid else None),
        ("nvmlDeviceGetProcessUtilization", True,
         lambda: N.nvmlDeviceGetProcessUtilization(h, int(time.time() * 1e6) - 2_000_000)),
        ("nvmlDeviceGetPcieThroughput (TX; opt-in)", False,
         lambda: N.nvmlDeviceGetPcieThroughput(h, N.NVML_PCIE_UTIL_TX_BYTES)),
        ("nvmlDeviceGetUUID (once per GPU)", False, lambda: N.nvmlDeviceGetUUID(h)),
        ("nvmlDeviceGetSerial (once per GPU)", False, lambda: N.nvmlDeviceGetSerial(h)),
    ]
    return out + gpm


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--interval", type=float, default=1.0,
                        help="seconds between rounds, as between the collector's cycles")
    args = parser.parse_args()
    N.nvmlInit()
    h = N.nvmlDeviceGetHandleByIndex(args.gpu)
    try:
        procs = N.nvmlDeviceGetComputeRunningProcesses(h)
    except N.NVMLError:
        procs = []
    pid = procs[0].pid if procs else 0
    table = calls(h, pid)
    first = {name: [] for name, _, _ in table}
    again = {name: [] for name, _, _ in table}
    results = {name: "ok" for name, _, _ in table}
    sums = []
    tick = time.monotonic()
    for _ in range(args.rounds):
        tick += args.interval
        time.sleep(max(0.0, tick - time.monotonic()))
        total = 0.0
        for name, every_cycle, thunk in table:
            for bucket in (first, again):
                c0 = time.thread_time_ns()
                try:
                    thunk()
                except N.NVMLError as e:
                    results[name] = str(e)
                bucket[name].append((time.thread_time_ns() - c0) / 1e3)
            if every_cycle and results[name] == "ok":
                total += first[name][-1]
        sums.append(total)
    print(f"driver {N.nvmlSystemGetDriverVersion()}, GPU {args.gpu}: "
          f"{N.nvmlDeviceGetName(h)}, {len(procs)} compute process(es); {args.rounds} rounds "
          f"{args.interval:g} s apart, each call made once and then at once again\n")
    print("| NVML call | every cycle | result | CPU, once per round (median) | max | "
          "CPU, again at once (median) |")
    print("|---|---|---|---|---|---|")
    for name, every_cycle, _ in table:
        print(f"| {name} | {'yes' if every_cycle else 'no'} | {results[name]} | "
              f"{statistics.median(first[name]):.0f} µs | {max(first[name]):.0f} µs | "
              f"{statistics.median(again[name]):.0f} µs |")
    print(f"\nCPU of the successful every-cycle calls per round (thread CPU time, the driver's "
          f"ioctls included; Python adds about 1-3 µs a call): median "
          f"{statistics.median(sums) / 1e3:.2f} ms, rounds: "
          f"{', '.join(f'{x / 1e3:.2f}' for x in sums)} ms\n")
    N.nvmlShutdown()


if __name__ == "__main__":
    main()

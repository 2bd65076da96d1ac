"""Reads every GPU through nvidia-ml-py (pynvml) with the calls common NVML clients make and
prints one JSON object; run by tests/e2e/tests/nvml.rs against the NVML simulator (found as
libnvidia-ml.so.1 on LD_LIBRARY_PATH), unchanged from how it would run on a real node."""

import json

import pynvml as N

N.nvmlInit()
gpus = []
for i in range(N.nvmlDeviceGetCount()):
    h = N.nvmlDeviceGetHandleByIndex(i)
    uuid = N.nvmlDeviceGetUUID(h)
    mem = N.nvmlDeviceGetMemoryInfo(h)
    util = N.nvmlDeviceGetUtilizationRates(h)
    try:
        fan = N.nvmlDeviceGetFanSpeed(h)
    except N.NVMLError as e:
        fan = str(e)
    gpus.append(
        {
            "index": i,
            "uuid": uuid,
            "same_handle_by_uuid": N.nvmlDeviceGetIndex(N.nvmlDeviceGetHandleByUUID(uuid)) == i,
            "name": N.nvmlDeviceGetName(h),
            "pci_bus_id": N.nvmlDeviceGetPciInfo(h).busId,
            "memory_total": mem.total,
            "memory_used": mem.used,
            "memory_free": mem.free,
            "utilization_gpu": util.gpu,
            "temperature": N.nvmlDeviceGetTemperature(h, N.NVML_TEMPERATURE_GPU),
            "power_mw": N.nvmlDeviceGetPowerUsage(h),
            "power_limit_mw": N.nvmlDeviceGetPowerManagementLimit(h),
            "energy_mj": N.nvmlDeviceGetTotalEnergyConsumption(h),
            "sm_clock_mhz": N.nvmlDeviceGetClockInfo(h, N.NVML_CLOCK_SM),
            "fan": fan,
            "compute_capability": list(N.nvmlDeviceGetCudaComputeCapability(h)),
            "processes": [
                {"pid": p.pid, "used": p.usedGpuMemory}
                for p in N.nvmlDeviceGetComputeRunningProcesses(h)
            ],
        }
    )
print(
    json.dumps(
        {
            "driver": N.nvmlSystemGetDriverVersion(),
            "nvml": N.nvmlSystemGetNVMLVersion(),
            "cuda": N.nvmlSystemGetCudaDriverVersion(),
            "gpus": gpus,
        }
    )
)
N.nvmlShutdown()

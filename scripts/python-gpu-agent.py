"""A seed-style GPU agent for side-by-side runs (scripts/nvml-side-by-side.sh): nvidia-ml-py
(pynvml) and prometheus_client, reading every GPU each INTERVAL seconds into gauges served on
PORT, as the small Python exporters GPU fleets start from do. Not part of metricsd.

    python3 scripts/python-gpu-agent.py PORT INTERVAL
"""

import sys
import time

import pynvml as N
from prometheus_client import Counter, Gauge, start_http_server

port, interval = int(sys.argv[1]), float(sys.argv[2])
labels = ["gpu", "uuid", "name"]
util = Gauge("gpu_utilization_percent", "GPU utilization", labels)
mem_util = Gauge("gpu_memory_utilization_percent", "Memory controller utilization", labels)
mem_used = Gauge("gpu_memory_used_bytes", "Memory used", labels)
mem_total = Gauge("gpu_memory_total_bytes", "Memory installed", labels)
temp = Gauge("gpu_temperature_celsius", "Temperature", labels)
power = Gauge("gpu_power_watts", "Power draw", labels)
limit = Gauge("gpu_power_limit_watts", "Power limit", labels)
sm_clock = Gauge("gpu_sm_clock_hertz", "SM clock", labels)
mem_clock = Gauge("gpu_memory_clock_hertz", "Memory clock", labels)
energy = Gauge("gpu_energy_joules", "Energy since driver load", labels)
processes = Gauge("gpu_processes", "Compute processes", labels)
errors = Counter("gpu_agent_errors", "Failed reads")

N.nvmlInit()
start_http_server(port, addr="127.0.0.1")
while True:
    began = time.monotonic()
    for i in range(N.nvmlDeviceGetCount()):
        try:
            h = N.nvmlDeviceGetHandleByIndex(i)
            ids = (str(i), N.nvmlDeviceGetUUID(h), N.nvmlDeviceGetName(h))
            u = N.nvmlDeviceGetUtilizationRates(h)
            util.labels(*ids).set(u.gpu)
            mem_util.labels(*ids).set(u.memory)
            m = N.nvmlDeviceGetMemoryInfo(h)
            mem_used.labels(*ids).set(m.used)
            mem_total.labels(*ids).set(m.total)
            temp.labels(*ids).set(N.nvmlDeviceGetTemperature(h, N.NVML_TEMPERATURE_GPU))
            power.labels(*ids).set(N.nvmlDeviceGetPowerUsage(h) / 1000)
            limit.labels(*ids).set(N.nvmlDeviceGetEnforcedPowerLimit(h) / 1000)
            sm_clock.labels(*ids).set(N.nvmlDeviceGetClockInfo(h, N.NVML_CLOCK_SM) * 1e6)
            mem_clock.labels(*ids).set(N.nvmlDeviceGetClockInfo(h, N.NVML_CLOCK_MEM) * 1e6)
            energy.labels(*ids).set(N.nvmlDeviceGetTotalEnergyConsumption(h) / 1000)
            processes.labels(*ids).set(len(N.nvmlDeviceGetComputeRunningProcesses(h)))
        except N.NVMLError:
            errors.inc()
    time.sleep(max(0.0, interval - (time.monotonic() - began)))

//! The `dcgm` naming profile: dcgm-exporter's metric names, units and labels for the metrics
//! both exporters have, so an existing DCGM Grafana dashboard works unchanged. Metrics dcgm-
//! exporter does not have keep metricsd's names and labels.

use std::collections::BTreeMap;

use metricsd_plugin_api::{Batch, BatchBuilder, Label, LabelSetId, MetricKind};

/// One DCGM field: name, kind, unit as dcgm-exporter reports it, and the factor from
/// metricsd's base unit.
pub struct Field {
    /// DCGM field name.
    pub name: &'static str,
    /// Gauge or counter.
    pub kind: MetricKind,
    /// DCGM's unit (`MHz`, `W`, `MiB`, `mJ`, `%`, `°C`, …), empty when none.
    pub unit: &'static str,
    /// Multiply metricsd's value by this.
    pub scale: f64,
}

const fn field(name: &'static str, kind: MetricKind, unit: &'static str, scale: f64) -> Field {
    Field {
        name,
        kind,
        unit,
        scale,
    }
}

const G: MetricKind = MetricKind::GAUGE;
const C: MetricKind = MetricKind::COUNTER;
const MIB: f64 = 1.0 / 1_048_576.0;

/// The DCGM field of a metricsd sample, given its name and labels.
pub fn field_for(name: &str, labels: &[Label]) -> Option<Field> {
    let label = |key: &str| {
        labels
            .iter()
            .find(|l| l.name.as_str() == key)
            .map(|l| l.value.as_str())
    };
    Some(
        match (name, label("clock"), label("type"), label("scope")) {
            ("gpu_clock_hertz", Some("sm"), _, _) => field("DCGM_FI_DEV_SM_CLOCK", G, "MHz", 1e-6),
            ("gpu_clock_hertz", Some("memory"), _, _) => {
                field("DCGM_FI_DEV_MEM_CLOCK", G, "MHz", 1e-6)
            }
            ("gpu_clock_hertz", Some("video"), _, _) => {
                field("DCGM_FI_DEV_VIDEO_CLOCK", G, "MHz", 1e-6)
            }
            ("gpu_clock_max_hertz", Some("sm"), _, _) => {
                field("DCGM_FI_DEV_MAX_SM_CLOCK", G, "MHz", 1e-6)
            }
            ("gpu_clock_max_hertz", Some("memory"), _, _) => {
                field("DCGM_FI_DEV_MAX_MEM_CLOCK", G, "MHz", 1e-6)
            }
            ("gpu_clock_max_hertz", Some("video"), _, _) => {
                field("DCGM_FI_DEV_MAX_VIDEO_CLOCK", G, "MHz", 1e-6)
            }
            ("gpu_temperature_celsius", ..) => field("DCGM_FI_DEV_GPU_TEMP", G, "°C", 1.0),
            ("gpu_temperature_slowdown_threshold_celsius", ..) => {
                field("DCGM_FI_DEV_SLOWDOWN_TEMP", G, "°C", 1.0)
            }
            ("gpu_temperature_shutdown_threshold_celsius", ..) => {
                field("DCGM_FI_DEV_SHUTDOWN_TEMP", G, "°C", 1.0)
            }
            ("gpu_power_usage_watts", ..) => field("DCGM_FI_DEV_POWER_USAGE", G, "W", 1.0),
            ("gpu_power_management_limit_watts", ..) => {
                field("DCGM_FI_DEV_POWER_MGMT_LIMIT", G, "W", 1.0)
            }
            ("gpu_power_limit_watts", ..) => field("DCGM_FI_DEV_ENFORCED_POWER_LIMIT", G, "W", 1.0),
            ("gpu_energy_consumed_joules_total", ..) => {
                field("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", C, "mJ", 1000.0)
            }
            ("gpu_utilization_ratio", ..) => field("DCGM_FI_DEV_GPU_UTIL", G, "%", 100.0),
            ("gpu_memory_utilization_ratio", ..) => {
                field("DCGM_FI_DEV_MEM_COPY_UTIL", G, "%", 100.0)
            }
            ("gpu_encoder_utilization_ratio", ..) => field("DCGM_FI_DEV_ENC_UTIL", G, "%", 100.0),
            ("gpu_decoder_utilization_ratio", ..) => field("DCGM_FI_DEV_DEC_UTIL", G, "%", 100.0),
            ("gpu_memory_free_bytes", ..) => field("DCGM_FI_DEV_FB_FREE", G, "MiB", MIB),
            ("gpu_memory_used_bytes", ..) => field("DCGM_FI_DEV_FB_USED", G, "MiB", MIB),
            ("gpu_memory_reserved_bytes", ..) => field("DCGM_FI_DEV_FB_RESERVED", G, "MiB", MIB),
            ("gpu_fan_speed_ratio", ..) => field("DCGM_FI_DEV_FAN_SPEED", G, "%", 100.0),
            ("gpu_performance_state", ..) => field("DCGM_FI_DEV_PSTATE", G, "", 1.0),
            ("gpu_pcie_replays_total", ..) => field("DCGM_FI_DEV_PCIE_REPLAY_COUNTER", C, "", 1.0),
            ("gpu_pcie_link_generation", ..) => field("DCGM_FI_DEV_PCIE_LINK_GEN", G, "", 1.0),
            ("gpu_pcie_link_width", ..) => field("DCGM_FI_DEV_PCIE_LINK_WIDTH", G, "", 1.0),
            ("gpu_pcie_link_max_generation", ..) => {
                field("DCGM_FI_DEV_PCIE_MAX_LINK_GEN", G, "", 1.0)
            }
            ("gpu_pcie_link_max_width", ..) => field("DCGM_FI_DEV_PCIE_MAX_LINK_WIDTH", G, "", 1.0),
            ("gpu_ecc_errors_total", _, Some("corrected"), Some("volatile")) => {
                field("DCGM_FI_DEV_ECC_SBE_VOL_TOTAL", C, "", 1.0)
            }
            ("gpu_ecc_errors_total", _, Some("uncorrected"), Some("volatile")) => {
                field("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", C, "", 1.0)
            }
            ("gpu_ecc_errors_total", _, Some("corrected"), Some("aggregate")) => {
                field("DCGM_FI_DEV_ECC_SBE_AGG_TOTAL", C, "", 1.0)
            }
            ("gpu_ecc_errors_total", _, Some("uncorrected"), Some("aggregate")) => {
                field("DCGM_FI_DEV_ECC_DBE_AGG_TOTAL", C, "", 1.0)
            }
            ("gpu_retired_pages_pending", ..) => field("DCGM_FI_DEV_RETIRED_PENDING", G, "", 1.0),
            ("gpu_memory_temperature_celsius", ..) => {
                field("DCGM_FI_DEV_MEMORY_TEMP", G, "°C", 1.0)
            }
            ("gpu_remapped_rows_total", _, Some("correctable"), _) => {
                field("DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS", C, "", 1.0)
            }
            ("gpu_remapped_rows_total", _, Some("uncorrectable"), _) => {
                field("DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS", C, "", 1.0)
            }
            ("gpu_row_remap_failure", ..) => field("DCGM_FI_DEV_ROW_REMAP_FAILURE", G, "", 1.0),
            ("gpu_retired_pages_total", ..)
                if label("cause") == Some("multiple_single_bit_ecc") =>
            {
                field("DCGM_FI_DEV_RETIRED_SBE", C, "", 1.0)
            }
            ("gpu_retired_pages_total", ..) if label("cause") == Some("double_bit_ecc") => {
                field("DCGM_FI_DEV_RETIRED_DBE", C, "", 1.0)
            }
            ("gpu_graphics_engine_active_ratio", ..) => {
                field("DCGM_FI_PROF_GR_ENGINE_ACTIVE", G, "ratio", 1.0)
            }
            ("gpu_tensor_active_ratio", ..) => {
                field("DCGM_FI_PROF_PIPE_TENSOR_ACTIVE", G, "ratio", 1.0)
            }
            ("gpu_dram_active_ratio", ..) => field("DCGM_FI_PROF_DRAM_ACTIVE", G, "ratio", 1.0),
            ("gpu_sm_active_ratio", ..) => field("DCGM_FI_PROF_SM_ACTIVE", G, "ratio", 1.0),
            ("gpu_sm_occupancy_ratio", ..) => field("DCGM_FI_PROF_SM_OCCUPANCY", G, "ratio", 1.0),
            ("gpu_fp64_active_ratio", ..) => {
                field("DCGM_FI_PROF_PIPE_FP64_ACTIVE", G, "ratio", 1.0)
            }
            ("gpu_fp32_active_ratio", ..) => {
                field("DCGM_FI_PROF_PIPE_FP32_ACTIVE", G, "ratio", 1.0)
            }
            ("gpu_fp16_active_ratio", ..) => {
                field("DCGM_FI_PROF_PIPE_FP16_ACTIVE", G, "ratio", 1.0)
            }
            ("gpu_last_xid", ..) => field("DCGM_FI_DEV_XID_ERRORS", G, "last Xid", 1.0),
            _ => return None,
        },
    )
}

/// The clocks-event reason bitmask field (metricsd reports one 0/1 series per reason).
pub const CLOCKS_EVENT_REASONS: Field =
    field("DCGM_FI_DEV_CLOCKS_EVENT_REASONS", G, "bitmask", 1.0);

/// Translates a batch in metricsd's names into `out` with DCGM names where dcgm-exporter has
/// the metric. `hostname` and `driver_version` become the `Hostname` and
/// `DCGM_FI_DRIVER_VERSION` labels.
pub fn translate(
    batch: &Batch,
    out: &mut BatchBuilder,
    hostname: &str,
    driver_version: &str,
    reason_bits: &[(u64, &str)],
) {
    // DCGM labels per GPU, built once per GPU.
    let mut gpu_sets: BTreeMap<String, LabelSetId> = BTreeMap::new();
    let mut bitmasks: BTreeMap<String, u64> = BTreeMap::new();
    // Per GPU and error type, the NVLink error counters summed over links.
    let mut nvlink_errors: BTreeMap<(String, &'static str), f64> = BTreeMap::new();
    let mut dcgm_set = |out: &mut BatchBuilder, labels: &[Label]| -> Option<(String, LabelSetId)> {
        let get = |key: &str| {
            labels
                .iter()
                .find(|l| l.name.as_str() == key)
                .map(|l| l.value.to_string())
        };
        let gpu = get("gpu")?;
        let set = *gpu_sets.entry(gpu.clone()).or_insert_with(|| {
            let device = format!("nvidia{gpu}");
            let uuid = get("uuid").unwrap_or_default();
            let model = get("name").unwrap_or_default();
            let bus = get("pci_bus_id").unwrap_or_default();
            out.label_set(&[
                ("gpu", gpu.as_str()),
                ("UUID", uuid.as_str()),
                ("pci_bus_id", bus.as_str()),
                ("device", device.as_str()),
                ("modelName", model.as_str()),
                ("Hostname", hostname),
                ("DCGM_FI_DRIVER_VERSION", driver_version),
            ])
        });
        Some((gpu, set))
    };
    for s in batch.samples.iter() {
        let Some(family) = batch.family_of(s) else {
            continue;
        };
        let own = batch.own_labels_of(s);
        let name = family.name.as_str();
        if name == "gpu_clocks_event_active" {
            if let (Some((gpu, _)), Some(reason)) = (
                dcgm_set(out, own),
                own.iter().find(|l| l.name.as_str() == "reason"),
            ) {
                let bit = reason_bits
                    .iter()
                    .find(|(_, r)| *r == reason.value.as_str())
                    .map(|(b, _)| *b)
                    .unwrap_or(0);
                let mask = bitmasks.entry(gpu).or_insert(0);
                if s.value != 0.0 {
                    *mask |= bit;
                }
            }
            continue;
        }
        if name == "gpu_nvlink_errors_total" {
            let kind = own
                .iter()
                .find(|l| l.name.as_str() == "type")
                .and_then(|l| nvlink_error_field(l.value.as_str()));
            if let (Some((gpu, _)), Some(field)) = (dcgm_set(out, own), kind) {
                *nvlink_errors.entry((gpu, field)).or_insert(0.0) += s.value;
            }
            continue;
        }
        match (field_for(name, own), dcgm_set(out, own)) {
            (Some(f), Some((_, set))) => {
                let id = out.family(f.name, family.help.as_str(), f.unit, f.kind);
                out.sample_in(id, set, s.value * f.scale);
            }
            _ => {
                // Not a dcgm-exporter metric: metricsd's own name and labels.
                let id = out.family(
                    name,
                    family.help.as_str(),
                    family.unit.as_str(),
                    family.kind,
                );
                let set = out.label_set_owned(own.iter().cloned().collect());
                out.sample_in(id, set, s.value);
            }
        }
    }
    for (gpu, mask) in bitmasks {
        if let Some(set) = gpu_sets.get(&gpu) {
            let f = &CLOCKS_EVENT_REASONS;
            let id = out.family(
                f.name,
                "Clocks event (throttle) reasons bitmask.",
                f.unit,
                f.kind,
            );
            out.sample_in(id, *set, mask as f64);
        }
    }
    for ((gpu, field), total) in nvlink_errors {
        if let Some(set) = gpu_sets.get(&gpu) {
            let id = out.family(
                field,
                "NVLink errors of this type, summed over the GPU's links.",
                "",
                C,
            );
            out.sample_in(id, *set, total);
        }
    }
}

/// dcgm-exporter's per-GPU NVLink error total for metricsd's `type` label.
fn nvlink_error_field(kind: &str) -> Option<&'static str> {
    Some(match kind {
        "crc_flit" => "DCGM_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL",
        "crc_data" => "DCGM_FI_DEV_NVLINK_CRC_DATA_ERROR_COUNT_TOTAL",
        "replay" => "DCGM_FI_DEV_NVLINK_REPLAY_ERROR_COUNT_TOTAL",
        "recovery" => "DCGM_FI_DEV_NVLINK_RECOVERY_ERROR_COUNT_TOTAL",
        _ => return None,
    })
}

// Lays out the code the agent runs side by side in release builds (see metricsd-build-support).
fn main() {
    metricsd_build_support::link_in_run_order();
}

//! Guards the released interface: the current `PluginModule` (and everything reachable from it:
//! batches, errors, the collector and sink vtables) must stay layout-compatible with the frozen
//! copy of 1.0.0, in both directions (an old plugin in a new host, a new plugin in an old host).
//! Appending prefix fields or trait methods after `last_prefix_field` passes; changing a
//! released struct fails here before any `.so` is built.

#[path = "frozen/abi_v1_0.rs"]
#[allow(non_local_definitions, dead_code)]
mod frozen;

use abi_stable::abi_stability::abi_checking::check_layout_compatibility;
use abi_stable::StableAbi;

#[test]
fn plugins_built_against_1_0_load_in_this_host() {
    let host = <metricsd_plugin_api::abi::PluginModuleRef as StableAbi>::LAYOUT;
    let plugin_1_0 = <frozen::PluginModuleRef as StableAbi>::LAYOUT;
    if let Err(e) = check_layout_compatibility(host, plugin_1_0) {
        panic!("breaking change against plugin-api 1.0.0:\n{e}");
    }
}

#[test]
fn plugins_built_against_this_version_load_in_a_1_0_host() {
    let host_1_0 = <frozen::PluginModuleRef as StableAbi>::LAYOUT;
    let plugin = <metricsd_plugin_api::abi::PluginModuleRef as StableAbi>::LAYOUT;
    if let Err(e) = check_layout_compatibility(host_1_0, plugin) {
        panic!("a 1.0 host could not load plugins built now:\n{e}");
    }
}

#[test]
fn the_check_detects_a_changed_struct() {
    // Sanity check of the check itself: two unrelated layouts must not be compatible.
    let module = <metricsd_plugin_api::abi::PluginModuleRef as StableAbi>::LAYOUT;
    let batch = <metricsd_plugin_api::Batch as StableAbi>::LAYOUT;
    assert!(check_layout_compatibility(module, batch).is_err());
    let info = <frozen::PluginInfo as StableAbi>::LAYOUT;
    let current_info = <metricsd_plugin_api::abi::PluginInfo as StableAbi>::LAYOUT;
    check_layout_compatibility(current_info, info).expect("PluginInfo unchanged since 1.0");
}

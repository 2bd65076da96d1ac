//! The GPU discovery protocol, `gpudiscovery.v1` (`discovery.proto` beside this crate), as
//! tonic/prost code generated at build time: the client the discovery collector uses and the
//! server trait the reference server (`examples/discovery-server`) implements.

#![allow(missing_docs)]

/// `gpudiscovery.v1`.
pub mod v1 {
    tonic::include_proto!("gpudiscovery.v1");
}

pub use v1::gpu_discovery_client::GpuDiscoveryClient;
pub use v1::gpu_discovery_server::{GpuDiscovery, GpuDiscoveryServer};
pub use v1::{
    gpu_event, Gpu, GpuEvent, Health, ListGpusRequest, ListGpusResponse, WatchGpusRequest,
};

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;

    /// A newer server's `Gpu` with a field this version does not know.
    #[derive(Clone, PartialEq, prost::Message)]
    struct GpuWithMore {
        #[prost(string, tag = "1")]
        uuid: String,
        #[prost(string, tag = "6")]
        gpu_id: String,
        #[prost(string, tag = "99")]
        something_new: String,
        #[prost(uint64, tag = "100")]
        another: u64,
    }

    #[test]
    fn unknown_fields_are_skipped() {
        let newer = GpuWithMore {
            uuid: "GPU-1".into(),
            gpu_id: "net-1".into(),
            something_new: "x".repeat(100),
            another: 7,
        };
        let gpu = Gpu::decode(newer.encode_to_vec().as_slice()).expect("decodes");
        assert_eq!(gpu.uuid, "GPU-1");
        assert_eq!(gpu.gpu_id, "net-1");
    }
}

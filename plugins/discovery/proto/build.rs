//! Generates the gRPC client and server from `../proto/discovery.proto` with protox, a
//! protobuf compiler in Rust: a fresh machine builds it without `protoc` or a network.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "discovery.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["."])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}

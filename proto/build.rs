//! Generates the Rust types and the tonic client and server from `switchyard/v1`.
//! `protoc` comes from the protoc-bin-vendored crate: no system package is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: a build script runs on one thread, so no other thread reads the
    // environment while it changes; prost-build reads PROTOC from it.
    unsafe { std::env::set_var("PROTOC", protoc) };
    println!("cargo:rerun-if-changed=switchyard/v1/broker.proto");
    tonic_prost_build::configure()
        .bytes(".switchyard.v1")
        // Written by hand (src/batch.rs): the broker writes deliveries itself.
        .extern_path(
            ".switchyard.v1.DeliveryBatch",
            "crate::batch::DeliveryBatch",
        )
        // Written by hand (src/publish.rs): the broker reads requests itself.
        .extern_path(
            ".switchyard.v1.PublishRequest",
            "crate::publish::PublishRequest",
        )
        .extern_path(
            ".switchyard.v1.PublishRecord",
            "crate::publish::PublishRecord",
        )
        .compile_protos(&["switchyard/v1/broker.proto"], &["."])?;
    Ok(())
}

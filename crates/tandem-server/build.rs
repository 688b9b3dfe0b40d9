//! Compiles MII's `modelresponse.proto` with a vendored `protoc`, so a fresh machine needs no
//! protobuf compiler installed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY (edition 2021: set_var is safe): build scripts are single-threaded here.
    std::env::set_var("PROTOC", protoc);
    let include = protoc_bin_vendored::include_path()?;
    tonic_build::configure().compile_protos(
        &["proto/modelresponse.proto"],
        &[std::path::PathBuf::from("proto"), include],
    )?;
    println!("cargo:rerun-if-changed=proto/modelresponse.proto");
    Ok(())
}
